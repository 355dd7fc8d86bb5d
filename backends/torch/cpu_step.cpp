// One step of the mLSTM on CPU without autograd: what MLSTMCell (and MLSTM on a one-step sequence) runs
// when nothing needs a gradient, e.g. in text generation. The ordinary path issues about ten torch
// operations from Python per step, each paying the dispatcher's fixed cost; here a step is three BLAS
// calls on the weights as they are stored (no transposed or packed copies, which would cost a pass over
// the weights on every call) and one vectorised pass for the element-wise work. It is compiled into the
// same extension as cpu_loops.cpp (backends/torch/build.py), which registers it as `cell_step`.
//
// The equations are those of backends/torch/plain.py:plain_step: p = x W_ih^T + b_ih (blocks m, i, o, f, z),
// r = h W_hh^T + b_hh (or h * w_hh, a vector, under independent recurrence), m = p_m r,
// q = m W_mh^T + b_mh, a = p_g + q (addition) or p_g q (multiplicative integration),
// (i, o, f) = sigmoid, z = tanh, c' = f c + i z, h' = o tanh(c').

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "mkl_routines.h"

namespace {

using at::Tensor;
using at::vec::Vectorized;

// C (rows x n, contiguous) = A (rows x k, contiguous) W^T, W (n x k) row-major as the parameters are
// stored; plus what C holds when accumulate. Row-major W is column-major W^T, so W^T A^T (the
// column-major view of C) is a product with W transposed: one gemv for a single row.
template <typename scalar_t>
void times_transposed(int64_t rows, int64_t n, int64_t k, const scalar_t* A, const scalar_t* W, bool accumulate,
                      scalar_t* C) {
#if AT_MKL_ENABLED()
  const char t = 'T', no = 'N';
  const int n_ = static_cast<int>(n), k_ = static_cast<int>(k), rows_ = static_cast<int>(rows), one_step = 1;
  const scalar_t one(1), beta(accumulate ? 1 : 0);
  if (rows == 1) {
    if constexpr (std::is_same_v<scalar_t, float>)
      sgemv_(&t, &k_, &n_, &one, W, &k_, A, &one_step, &beta, C, &one_step);
    else
      dgemv_(&t, &k_, &n_, &one, W, &k_, A, &one_step, &beta, C, &one_step);
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float>)
    sgemm_(&t, &no, &n_, &rows_, &k_, &one, W, &k_, A, &k_, &beta, C, &n_);
  else
    dgemm_(&t, &no, &n_, &rows_, &k_, &one, W, &k_, A, &k_, &beta, C, &n_);
#else
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  Tensor a = at::from_blob(const_cast<scalar_t*>(A), {rows, k}, options);
  Tensor w = at::from_blob(const_cast<scalar_t*>(W), {n, k}, options);
  Tensor c = at::from_blob(C, {rows, n}, options);
  if (accumulate) c.addmm_(a, w.t());
  else at::mm_out(c, a, w.t());
#endif
}

template <typename scalar_t>
inline Vectorized<scalar_t> sigmoid(const Vectorized<scalar_t>& x) {
  const Vectorized<scalar_t> one(scalar_t(1));
  return one / (one + x.neg().exp());
}

template <typename scalar_t>
inline Vectorized<scalar_t> load_or_zero(const scalar_t* base, int64_t at, int count) {
  return base ? Vectorized<scalar_t>::loadu(base + at, count) : Vectorized<scalar_t>(scalar_t(0));
}

// Rows [b0, b1): r = (r, or h * w_hh_vector) + b_hh; m = (p_m + b_ih_m) r.
template <typename scalar_t>
void mix(int64_t b0, int64_t b1, int64_t H, const scalar_t* p, const scalar_t* b_ih, const scalar_t* h,
         const scalar_t* w_hh_vector, const scalar_t* b_hh, scalar_t* r, scalar_t* m) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t width = V::size();
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t j = 0; j < H; j += width) {
      const int count = static_cast<int>(std::min<int64_t>(width, H - j));
      const int64_t at = b * H + j;
      V v = w_hh_vector ? V::loadu(h + at, count) * V::loadu(w_hh_vector + j, count) : V::loadu(r + at, count);
      if (b_hh) v = v + V::loadu(b_hh + j, count);
      V p_m = V::loadu(p + b * 5 * H + j, count);
      if (b_ih) p_m = p_m + V::loadu(b_ih + j, count);
      (p_m * v).store(m + at, count);
    }
}

// Rows [b0, b1): the gates from p (B, 5H) and q (B, 4H, b_mh already in it under multiplicative
// integration), then c' and h'.
template <typename scalar_t>
void gates(int64_t b0, int64_t b1, int64_t H, const scalar_t* p, const scalar_t* b_ih, const scalar_t* q,
           const scalar_t* b_mh, bool multiplicative, const scalar_t* c, scalar_t* c_new, scalar_t* h_new) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t width = V::size();
  auto pre = [&](int64_t b, int64_t block, int64_t j, int count) {  // a of gate block (i, o, f, z)
    const int64_t col = block * H + j;
    V g = V::loadu(p + b * 5 * H + H + col, count);
    if (b_ih) g = g + V::loadu(b_ih + H + col, count);
    const V product = V::loadu(q + b * 4 * H + col, count);
    if (multiplicative) return g * product;
    V a = g + product;
    if (b_mh) a = a + V::loadu(b_mh + col, count);
    return a;
  };
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t j = 0; j < H; j += width) {
      const int count = static_cast<int>(std::min<int64_t>(width, H - j));
      const int64_t at = b * H + j;
      const V i = sigmoid(pre(b, 0, j, count)), o = sigmoid(pre(b, 1, j, count)), f = sigmoid(pre(b, 2, j, count));
      const V z = pre(b, 3, j, count).tanh();
      const V c_next = f * V::loadu(c + at, count) + i * z;
      c_next.store(c_new + at, count);
      (o * c_next.tanh()).store(h_new + at, count);
    }
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const std::optional<Tensor>& t) {
  return t ? t->data_ptr<scalar_t>() : nullptr;
}

std::optional<Tensor> contiguous(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(t->contiguous()) : std::nullopt;
}

// x (B, I), h and c (B, H), float32 or float64, all on the CPU with one dtype: (h', c'), fresh tensors.
std::tuple<Tensor, Tensor> cell_step(const Tensor& x_given, const Tensor& h_given, const Tensor& c_given,
                                     const Tensor& w_ih_given, const Tensor& w_hh_given, const Tensor& w_mh_given,
                                     const std::optional<Tensor>& b_ih_given, const std::optional<Tensor>& b_hh_given,
                                     const std::optional<Tensor>& b_mh_given, bool multiplicative) {
  const Tensor x = x_given.contiguous(), h = h_given.contiguous(), c = c_given.contiguous();
  const Tensor w_ih = w_ih_given.contiguous(), w_hh = w_hh_given.contiguous(), w_mh = w_mh_given.contiguous();
  const std::optional<Tensor> b_ih = contiguous(b_ih_given), b_hh = contiguous(b_hh_given),
                              b_mh = contiguous(b_mh_given);
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  const bool independent = w_hh.dim() == 1;
  Tensor h_new = at::empty({B, H}, x.options()), c_new = at::empty({B, H}, x.options());
  Tensor scratch = at::empty({B * 11 * H}, x.options());  // p (5H), r (H), m (H), q (4H) per row
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlstm_cell_step", [&] {
    scalar_t* p = scratch.data_ptr<scalar_t>();
    scalar_t* r = p + B * 5 * H;
    scalar_t* m = r + B * H;
    scalar_t* q = m + B * H;
    const scalar_t* b_ih_p = ptr_or_null<scalar_t>(b_ih);
    const scalar_t* b_mh_p = ptr_or_null<scalar_t>(b_mh);
    times_transposed<scalar_t>(B, 5 * H, I, x.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(), false, p);
    if (!independent)
      times_transposed<scalar_t>(B, H, H, h.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), false, r);
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      mix<scalar_t>(b0, b1, H, p, b_ih_p, h.data_ptr<scalar_t>(), independent ? w_hh.data_ptr<scalar_t>() : nullptr,
                    ptr_or_null<scalar_t>(b_hh), r, m);
    });
    const bool bias_in_product = multiplicative && b_mh_p != nullptr;
    if (bias_in_product)
      for (int64_t b = 0; b < B; ++b) std::copy(b_mh_p, b_mh_p + 4 * H, q + b * 4 * H);
    times_transposed<scalar_t>(B, 4 * H, H, m, w_mh.data_ptr<scalar_t>(), bias_in_product, q);
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      gates<scalar_t>(b0, b1, H, p, b_ih_p, q, multiplicative ? nullptr : b_mh_p, multiplicative,
                      c.data_ptr<scalar_t>(), c_new.data_ptr<scalar_t>(), h_new.data_ptr<scalar_t>());
    });
  });
  return {h_new, c_new};
}

}  // namespace

void define_cell_step(pybind11::module& m) {
  m.def("cell_step", &cell_step, "one step of the cell without autograd: (h', c')");
}
