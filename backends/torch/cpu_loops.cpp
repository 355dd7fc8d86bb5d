// The CPU time loops of the PyTorch backend's fused layer: the same computation as backends/torch/loops.py,
// without its per-step costs. Each step is two BLAS
// calls on raw pointers and a few vectorised element-wise passes, instead of ~12 torch operations
// dispatched from Python. Compiled on first use (backends/torch/build.py) into a Python module whose two
// functions backends/torch/fused.py registers as the CPU kernels of its custom operators; the Python
// loops run where this cannot be compiled.
//
// Layouts (row-major, contiguous unless said): x (T, B, I); h0, c0 (B, H); the input projection p holds
// the blocks (m, i, o, f, z) along its last axis; gate pre-activations hold (i, o, f, z).
//
// variant_layer_forward / variant_layer_backward are the same loops for a layer with the spec's variants
// (backends/torch/variants.py registers them): separate functions, so that the variant-free layer runs
// exactly the code it ran before the variants existed.

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/utils/pybind.h>

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <chrono>
#include <functional>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <thread>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mkl_routines.h"

namespace {

using at::Tensor;
using at::vec::Vectorized;

// ---- matrix products and element-wise functions --------------------------------------------------------

// C (rows x n, row stride ldc) = A (rows x k, row stride lda) B, plus C if accumulate, where B is
// (k x n, row stride ldb), or with b_stored the transpose of the (n x k, row stride ldb) matrix given,
// as weights are stored. Row-major C = A B is column-major C^T = B^T A^T, hence the swapped operands.
template <typename scalar_t>
void gemm(int64_t rows, int64_t n, int64_t k, const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb,
          bool accumulate, scalar_t* C, int64_t ldc, bool b_stored = false) {
#if AT_MKL_ENABLED()
  const char no = 'N', b_op = b_stored ? 'T' : 'N';
  const int m_ = static_cast<int>(n), n_ = static_cast<int>(rows), k_ = static_cast<int>(k);
  const int lda_ = static_cast<int>(ldb), ldb_ = static_cast<int>(lda), ldc_ = static_cast<int>(ldc);
  const scalar_t one(1), beta(accumulate ? 1 : 0);
  if constexpr (std::is_same_v<scalar_t, float>)
    sgemm_(&b_op, &no, &m_, &n_, &k_, &one, B, &lda_, A, &ldb_, &beta, C, &ldc_);
  else
    dgemm_(&b_op, &no, &m_, &n_, &k_, &one, B, &lda_, A, &ldb_, &beta, C, &ldc_);
#else
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  Tensor a = at::from_blob(const_cast<scalar_t*>(A), {rows, k}, {lda, 1}, options);
  Tensor b = b_stored ? at::from_blob(const_cast<scalar_t*>(B), {n, k}, {ldb, 1}, options).t()
                      : at::from_blob(const_cast<scalar_t*>(B), {k, n}, {ldb, 1}, options);
  Tensor c = at::from_blob(C, {rows, n}, {ldc, 1}, options);
  if (accumulate) c.addmm_(a, b);
  else at::mm_out(c, a, b);
#endif
}

// ---- the OpenMP runtime's thread count for this thread ------------------------------------------------

// omp_get_max_threads and omp_set_num_threads of the OpenMP runtime torch loaded (its oneDNN runs on it),
// looked up in the process rather than linked: this file is not always compiled with OpenMP (see
// openmp() in build.py). Null where no OpenMP runtime is loaded.
struct OpenMpThreads {
  int (*get)();
  void (*set)(int);
};
const OpenMpThreads* openmp_threads() {
  static const std::optional<OpenMpThreads> found = []() -> std::optional<OpenMpThreads> {
    auto get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
    auto set = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
    if (!get || !set) return std::nullopt;
    return OpenMpThreads{get, set};
  }();
  return found ? &*found : nullptr;
}

// ---- oneDNN's products, through torch's operator --------------------------------------------------------

// torch's CPU builds carry oneDNN ("mkldnn"), the library nn.LSTM's CPU kernels run on, which picks its
// code for the processor's instruction sets whatever its vendor. Its symbols are not exported, but torch
// registers operators on it: mkldnn::_linear_pointwise, Y = X W^T for a dense float X (rows x k) and a
// weight W (n x k), and mkldnn::_reorder_linear_weight, which lays W out once in oneDNN's blocked format
// for products of a given row count (at 32 rows 1.3-1.7x faster per product here than a dense W, which
// oneDNN multiplies in its plain layout). Null where this torch has no such operators (built without
// oneDNN), or where this thread's OpenMP team cannot be set: a slice of the batch (sliced_layer_forward)
// must run its products on its own thread.
using OneDnnLinear = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                            c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);
using OneDnnReorder = Tensor(const Tensor&, std::optional<int64_t>);
struct OneDnn {
  c10::TypedOperatorHandle<OneDnnLinear> linear;
  c10::TypedOperatorHandle<OneDnnReorder> reorder;
};
const OneDnn* onednn() {
  static const std::optional<OneDnn> found = []() -> std::optional<OneDnn> {
    if (!at::hasMKLDNN() || !openmp_threads()) return std::nullopt;
    auto& dispatcher = c10::Dispatcher::singleton();
    const auto linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
    const auto reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
    if (!linear || !reorder) return std::nullopt;
    try {
      return OneDnn{linear->typed<OneDnnLinear>(), reorder->typed<OneDnnReorder>()};
    } catch (const std::exception&) {  // another torch's signatures: not used
      return std::nullopt;
    }
  }();
  return found ? &*found : nullptr;
}

// W (n x k, contiguous float) laid out for oneDNN's products of `rows` rows (onednn() not null).
Tensor onednn_weight(const Tensor& W, int64_t rows) {
  return onednn()->reorder.call(W, rows);
}

// X W^T (+ bias) on oneDNN (onednn() not null), for W dense or as onednn_weight gives it.
Tensor onednn_linear(const Tensor& X, const Tensor& W, const std::optional<Tensor>& bias = std::nullopt) {
  return onednn()->linear.call(X, W, bias, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

// C (rows x n, row stride ldc) = X W^T, plus C if accumulate, on oneDNN (onednn() not null), W as
// onednn_weight gives it.
void onednn_product(const Tensor& X, const Tensor& W, bool accumulate, float* C, int64_t ldc) {
  const Tensor Y = onednn_linear(X, W);
  const int64_t rows = X.size(0), n = W.size(0);
  const float* y = Y.data_ptr<float>();
  using V = Vectorized<float>;
  for (int64_t b = 0; b < rows; ++b) {
    float* c_row = C + b * ldc;
    const float* y_row = y + b * n;
    if (!accumulate) {
      std::copy(y_row, y_row + n, c_row);
      continue;
    }
    for (int64_t j = 0; j < n; j += V::size()) {
      const int count = static_cast<int>(std::min<int64_t>(V::size(), n - j));
      (V::loadu(c_row + j, count) + V::loadu(y_row + j, count)).store(c_row + j, count);
    }
  }
}

// How a float product of a given shape runs: plain MKL sgemm, MKL on a weight packed into its internal
// layout once per call (cblas_sgemm_pack/compute), or oneDNN. On the Intel Xeon this was tuned on,
// packed is 18-27% faster per step at the benchmark sizes (2 threads). MKL picks its code by vendor as
// well as by instruction set; with it held to AVX2 on that Xeon (MKL_ENABLE_INSTRUCTIONS=AVX2, which
// reproduced the slow layer reported from an AMD EPYC) its products ran at 22-39 G multiply-adds/s
// against oneDNN's 35-72. So the choice is measured, once per process for each shape and thread count
// over a few products of each (packing included): packed unless another is over 10% faster, kept for
// every later call. MLSTM_TORCH_STEP_GEMM=packed, =plain or =onednn fixes it instead;
// step_gemm_choices() reports them.
enum class Product { plain, packed, onednn };
const char* product_name(Product kind) {
  return kind == Product::packed ? "packed" : kind == Product::onednn ? "onednn" : "plain";
}
using ShapeKey = std::tuple<int64_t, int64_t, int64_t, int>;
std::mutex choices_mutex;  // guards every map of choices

// The choice kept for key, if any.
template <typename Map>
std::optional<typename Map::mapped_type> recall(const Map& choices, const typename Map::key_type& key) {
  std::lock_guard<std::mutex> guard(choices_mutex);
  const auto found = choices.find(key);
  if (found == choices.end()) return std::nullopt;
  return found->second;
}

// Keeps a choice for key: a fixed one (MLSTM_TORCH_STEP_GEMM) replaces what was kept, a measured one
// does not (a process measures a shape once; a second thread measuring it at the same time loses).
template <typename Map>
typename Map::mapped_type remember(Map& choices, const typename Map::key_type& key, typename Map::mapped_type chosen,
                                   bool fixed) {
  std::lock_guard<std::mutex> guard(choices_mutex);
  if (fixed) choices[key] = chosen;
  else chosen = choices.emplace(key, chosen).first->second;
  return chosen;
}
std::map<ShapeKey, Product> product_choices;  // (rows, n, k, threads) -> the fastest

#if AT_MKL_ENABLED()
double seconds(const std::function<void()>& work) {
  const auto start = std::chrono::steady_clock::now();
  work();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

Product step_product(const float* w, int64_t rows, int64_t n, int64_t k) {
  const ShapeKey key{rows, n, k, mkl_get_max_threads()};  // the threads MKL will use here (1 in a slice)
  if (const char* fixed = std::getenv("MLSTM_TORCH_STEP_GEMM")) {  // reported as the shape's choice
    const std::string kind(fixed);
    if (kind == "packed" || kind == "plain" || (kind == "onednn" && onednn())) {
      const Product chosen = kind == "packed" ? Product::packed : kind == "plain" ? Product::plain : Product::onednn;
      return remember(product_choices, key, chosen, /*fixed=*/true);
    }
  }
  if (const auto kept = recall(product_choices, key)) return *kept;
  // A stand-in left operand of ones (the products' time does not depend on the values, short of
  // denormals). A call packs once and runs T products, so the packing is timed on its own and counted
  // once per kAmortisedProducts products (a typical sequence's steps). Measured here (Intel Xeon, one
  // thread, best of 15): packed / plain per product 0.90, 0.85, 0.91 for the large benchmark's 32x512 by
  // 512x512, 32x512 by 512x2048 and 192x512 by 512x2560 products with the packing counted once per 8
  // products (as this did at first), 0.86, 0.81, 0.89 once per 32, 0.85, 0.79, 0.89 once per 100; one
  // process in five still chose plain for the first shape with 8 and 5 repeats. oneDNN is given the
  // (n x k) weight it multiplies by (its values are the same n*k; the choice concerns the shape).
  constexpr int kTimedProducts = 4, kAmortisedProducts = 32;
  std::vector<float> a(static_cast<size_t>(rows * k), 1.f), c(static_cast<size_t>(rows * n));
  std::vector<float> packed(cblas_sgemm_pack_get_size(kBMatrix, rows, n, k) / sizeof(float) + 1);
  auto pack = [&] { cblas_sgemm_pack(kRowMajor, kBMatrix, kNoTrans, rows, n, k, 1.f, w, n, packed.data()); };
  auto packed_products = [&] {
    for (int step = 0; step < kTimedProducts; ++step)
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, rows, n, k, a.data(), k, packed.data(), n, 0.f, c.data(), n);
  };
  auto plain_products = [&] {
    for (int step = 0; step < kTimedProducts; ++step) gemm<float>(rows, n, k, a.data(), k, w, n, false, c.data(), n);
  };
  const auto options = at::TensorOptions().dtype(at::kFloat);
  const Tensor a_tensor = at::from_blob(a.data(), {rows, k}, options);
  const Tensor w_tensor = at::from_blob(const_cast<float*>(w), {n, k}, options);
  const bool use_onednn = onednn() != nullptr;
  Tensor w_onednn;
  auto lay_out = [&] { w_onednn = onednn_weight(w_tensor, rows); };
  auto onednn_products = [&] {
    for (int step = 0; step < kTimedProducts; ++step) onednn_product(a_tensor, w_onednn, false, c.data(), n);
  };
  pack();  // warm-up: first touch of the buffers, MKL's and oneDNN's own set-up
  packed_products();
  plain_products();
  if (use_onednn) {
    lay_out();
    onednn_products();
  }
  // Alternated, so that a change of machine load between them hits all of them; the best of each.
  double pack_time = 1e30, packed_time = 1e30, plain_time = 1e30, lay_out_time = 1e30, onednn_time = 1e30;
  for (int repeat = 0; repeat < 7; ++repeat) {
    pack_time = std::min(pack_time, seconds(pack));
    packed_time = std::min(packed_time, seconds(packed_products));
    plain_time = std::min(plain_time, seconds(plain_products));
    if (!use_onednn) continue;
    lay_out_time = std::min(lay_out_time, seconds(lay_out));
    onednn_time = std::min(onednn_time, seconds(onednn_products));
  }
  packed_time += pack_time * kTimedProducts / kAmortisedProducts;
  onednn_time += lay_out_time * kTimedProducts / kAmortisedProducts;
  // Packed, the choice measured on Intel, unless another is clearly faster: noise on a busy machine
  // should not flip it, a vendor's slow path should.
  Product fastest = Product::packed;
  const double other_time = std::min(plain_time, onednn_time);
  if (other_time < 0.9 * packed_time) fastest = onednn_time < plain_time ? Product::onednn : Product::plain;
  return remember(product_choices, key, fastest, /*fixed=*/false);
}
#endif

// The choices so far, measured or fixed: a list of (rows, n, k, threads, "packed", "plain" or "onednn").
std::vector<std::tuple<int64_t, int64_t, int64_t, int, std::string>> step_gemm_choices() {
  std::lock_guard<std::mutex> guard(choices_mutex);
  std::vector<std::tuple<int64_t, int64_t, int64_t, int, std::string>> out;
  for (const auto& [key, kind] : product_choices)
    out.emplace_back(std::get<0>(key), std::get<1>(key), std::get<2>(key), std::get<3>(key), product_name(kind));
  return out;
}

// ---- the products over a whole sequence -----------------------------------------------------------------

// a (rows x k) W^T, plus bias (n) where given, for a weight W (n x k, contiguous or not), where rows spans
// a whole sequence (T * B, or chunks of it): the input projection of the loops that keep a tape, and
// d_x. On MKL (at::mm) or oneDNN, whichever measured faster for (n, k) and the thread count, once per
// process on 512-row products (a product's speed changes little with more rows): MKL unless oneDNN is
// over 10% faster. Measured here (Intel Xeon, 2 threads, 6400 rows): MKL 83 and 115 G multiply-adds/s for
// the projection and d_x of the large benchmark, oneDNN 80 and 107; with MKL held to AVX2 MKL 52 and
// 57, oneDNN 81 and 111. (The weight gradients, whose k is T * B, choose apart: see weight_gradient.)
// MLSTM_TORCH_STEP_GEMM (see step_product) fixes this choice too: oneDNN for =onednn, MKL otherwise.
#if AT_MKL_ENABLED()
// Whether oneDNN runs a whole-sequence product of (n, k, threads) faster, as MLSTM_TORCH_STEP_GEMM
// fixes it (=onednn: yes, otherwise no) or as kept from an earlier measurement; nothing if neither.
std::optional<bool> fixed_or_kept(std::map<std::tuple<int64_t, int64_t, int>, bool>& choices,
                                  const std::tuple<int64_t, int64_t, int>& key) {
  if (const char* fixed = std::getenv("MLSTM_TORCH_STEP_GEMM"))  // reported as the shape's choice
    return remember(choices, key, std::string(fixed) == "onednn", /*fixed=*/true);
  return recall(choices, key);
}

// Whether the oneDNN work is over 10% faster than the MKL work: each run once (warm-up), then the
// best of `repeats` runs of each, alternated so that a change of load hits both.
bool onednn_is_faster(const std::function<void()>& mkl_work, const std::function<void()>& onednn_work,
                      int repeats) {
  mkl_work();
  onednn_work();
  double mkl_time = 1e30, onednn_time = 1e30;
  for (int repeat = 0; repeat < repeats; ++repeat) {
    mkl_time = std::min(mkl_time, seconds(mkl_work));
    onednn_time = std::min(onednn_time, seconds(onednn_work));
  }
  return onednn_time < 0.9 * mkl_time;
}
#endif

std::map<std::tuple<int64_t, int64_t, int>, bool> sequence_choices;  // (n, k, threads) -> oneDNN is faster

bool sequence_product_on_onednn(const Tensor& w) {
#if AT_MKL_ENABLED()
  if (w.scalar_type() != at::kFloat || !onednn()) return false;
  const int64_t n = w.size(0), k = w.size(1);
  const std::tuple<int64_t, int64_t, int> key{n, k, at::get_num_threads()};
  if (const auto known = fixed_or_kept(sequence_choices, key)) return *known;
  constexpr int64_t kRows = 512;
  constexpr int kTimedProducts = 2;
  const Tensor a = at::ones({kRows, k}, w.options()), w_dense = at::ones({n, k}, w.options());
  Tensor c = at::empty({kRows, n}, w.options());
  auto mkl_products = [&] {
    for (int step = 0; step < kTimedProducts; ++step) at::mm_out(c, a, w_dense.t());
  };
  auto onednn_products = [&] {
    for (int step = 0; step < kTimedProducts; ++step) onednn_product(a, w_dense, false, c.data_ptr<float>(), n);
  };
  return remember(sequence_choices, key, onednn_is_faster(mkl_products, onednn_products, 4), /*fixed=*/false);
#else
  return false;
#endif
}

Tensor sequence_product(const Tensor& a, const Tensor& w, const std::optional<Tensor>& bias = std::nullopt) {
  if (sequence_product_on_onednn(w)) return onednn_linear(a, w, bias);
  return bias ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
}

std::map<std::tuple<int64_t, int64_t, int>, bool> gradient_choices;  // (n, k, threads) -> oneDNN is faster (see weight_gradient)

// The choices so far, measured or fixed: a list of (n, k, threads, "onednn" or "mkl").
std::vector<std::tuple<int64_t, int64_t, int, std::string>> listed(
    const std::map<std::tuple<int64_t, int64_t, int>, bool>& choices) {
  std::lock_guard<std::mutex> guard(choices_mutex);
  std::vector<std::tuple<int64_t, int64_t, int, std::string>> out;
  for (const auto& [key, onednn_faster] : choices)
    out.emplace_back(std::get<0>(key), std::get<1>(key), std::get<2>(key), onednn_faster ? "onednn" : "mkl");
  return out;
}
std::vector<std::tuple<int64_t, int64_t, int, std::string>> sequence_gemm_choices() {
  return listed(sequence_choices);
}
std::vector<std::tuple<int64_t, int64_t, int, std::string>> gradient_gemm_choices() {
  return listed(gradient_choices);
}

// dst (cols x rows, contiguous) = src^T for src (rows x cols, unit column stride), the columns split
// across torch's threads: MKL's omatcopy (for the weight gradients' 6400 x 2560 operand 18 ms, where
// torch's strided copy took 59-77 ms), or by hand. Never a torch copy, which would start an OpenMP team
// of its own from a slice's (non-OpenMP) thread (StepWeight runs in the slices; their OpenMP team is one
// thread, so at::parallel_for runs inline there).
template <typename scalar_t>
void transpose_into(const Tensor& src, const Tensor& dst) {
  const int64_t rows = src.size(0), cols = src.size(1);
  if (rows == 0 || cols == 0) return;
  TORCH_INTERNAL_ASSERT(src.stride(1) == 1 && dst.is_contiguous());
  const int64_t lda = std::max<int64_t>(src.stride(0), cols);
  const scalar_t* a = src.data_ptr<scalar_t>();
  scalar_t* b = dst.data_ptr<scalar_t>();
  at::parallel_for(0, cols, 64, [&](int64_t j0, int64_t j1) {
#if AT_MKL_ENABLED()
    if constexpr (std::is_same_v<scalar_t, float>)
      MKL_Somatcopy('R', 'T', rows, j1 - j0, 1.f, a + j0, lda, b + j0 * rows, rows);
    else
      MKL_Domatcopy('R', 'T', rows, j1 - j0, 1.0, a + j0, lda, b + j0 * rows, rows);
#else
    for (int64_t col = j0; col < j1; ++col)
      for (int64_t row = 0; row < rows; ++row) b[col * rows + row] = a[row * lda + col];
#endif
  });
}

// Memory for MKL's packed weights, kept from call to call in one pool for all threads. A weight is packed
// afresh at every call (its values may have changed), but into memory that has been touched before: a
// fresh buffer (MKL asks 9-14 MB for each of the large benchmark size's weights) cost each thread of
// the sliced forward 3-6 ms of page faults per call there, more than the packing itself (~1.5 ms).
// Up to kKeptPackedBytes are kept; a buffer that would exceed it is freed after its call.
constexpr size_t kKeptPackedBytes = size_t{128} << 20;
class PackedBuffer {
 public:
  explicit PackedBuffer(size_t bytes) {
    std::lock_guard<std::mutex> guard(pool_mutex());
    for (Block& block : pool()) {
      if (block.in_use || block.bytes < bytes) continue;
      block.in_use = true;
      block_ = &block;
      return;
    }
    own_.bytes = (bytes + 63) / 64 * 64;
    own_.memory.reset(static_cast<char*>(std::aligned_alloc(64, own_.bytes)));
    if (!own_.memory) throw std::bad_alloc();
    if (kept_bytes() + own_.bytes > kKeptPackedBytes) return;  // this call's own
    kept_bytes() += own_.bytes;
    own_.in_use = true;
    pool().push_back(std::move(own_));
    block_ = &pool().back();
  }
  ~PackedBuffer() {
    if (!block_) return;
    std::lock_guard<std::mutex> guard(pool_mutex());
    block_->in_use = false;
  }
  PackedBuffer(const PackedBuffer&) = delete;
  PackedBuffer& operator=(const PackedBuffer&) = delete;
  float* data() const { return reinterpret_cast<float*>(block_ ? block_->memory.get() : own_.memory.get()); }

 private:
  struct Block {
    std::unique_ptr<char, decltype(&std::free)> memory{nullptr, &std::free};
    size_t bytes = 0;
    bool in_use = false;
  };
  static std::mutex& pool_mutex() {
    static std::mutex mutex;
    return mutex;
  }
  static std::deque<Block>& pool() {  // a deque: its blocks stay where they are as it grows
    static std::deque<Block> blocks;
    return blocks;
  }
  static size_t& kept_bytes() {
    static size_t bytes = 0;
    return bytes;
  }
  Block* block_ = nullptr;  // in the pool, or null for own_
  Block own_;
};

// The right-hand operand of every step's product, W (k x n), for products with `rows` rows: given as
// it is (row-major k x n, contiguous), or with `stored` as the weight (n x k, contiguous) whose
// transpose it is. In float with MKL it runs as step_product measured fastest for this shape: packed
// once into MKL's internal layout (which saves the per-call packing of plain sgemm; MKL packs from
// either layout alike, so a stored weight needs no transposed copy then), on oneDNN (which multiplies
// by the stored layout: a weight given as W gets a transposed copy), or plain. Plain products run on W
// as given, or on a transposed copy of a stored weight (plain sgemm on the stored layout, "T", made the
// sliced forward at the small benchmark size 1.46x slower in one run).
template <typename scalar_t>
class StepWeight {
 public:
  StepWeight(const Tensor& w, int64_t rows, bool stored = false)
      : k_(w.size(stored ? 1 : 0)), n_(w.size(stored ? 0 : 1)), rows_(rows) {
#if AT_MKL_ENABLED()
    if constexpr (std::is_same_v<scalar_t, float>) {
      // The measurement times products on a (k x n) operand; for a stored weight it reads its n*k values
      // as one (the values do not change a product's time; the choice concerns the shape).
      const Product kind = step_product(w.data_ptr<float>(), rows, n_, k_);
      if (kind == Product::packed) {
        packed_ = std::make_unique<PackedBuffer>(cblas_sgemm_pack_get_size(kBMatrix, rows, n_, k_));
        cblas_sgemm_pack(kRowMajor, kBMatrix, stored ? kTrans : kNoTrans, rows, n_, k_, 1.f, w.data_ptr<float>(),
                         stored ? k_ : n_, packed_->data());
        return;
      }
      if (kind == Product::onednn) {
        onednn_weight_ = onednn_weight(stored ? w.contiguous() : transposed(w), rows);
        return;
      }
    }
#endif
    w_ = stored ? transposed(w) : w;
  }
  // C (rows x n, row stride ldc) = A (rows x k, row stride lda) W, plus C if accumulate
  void multiply(const scalar_t* A, int64_t lda, bool accumulate, scalar_t* C, int64_t ldc) const {
#if AT_MKL_ENABLED()
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (packed_) {
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, rows_, n_, k_, A, lda, packed_->data(), n_,
                            accumulate ? 1.f : 0.f, C, ldc);
        return;
      }
      if (onednn_weight_.defined()) {
        const Tensor a = at::from_blob(const_cast<float*>(A), {rows_, k_}, {lda, 1}, at::TensorOptions().dtype(at::kFloat));
        onednn_product(a, onednn_weight_, accumulate, C, ldc);
        return;
      }
    }
#endif
    gemm<scalar_t>(rows_, n_, k_, A, lda, w_.data_ptr<scalar_t>(), n_, accumulate, C, ldc);
  }

 private:
  static Tensor transposed(const Tensor& w) {  // of a contiguous matrix, contiguous
    Tensor out = at::empty({w.size(1), w.size(0)}, w.options());
    transpose_into<scalar_t>(w, out);
    return out;
  }
  Tensor w_, onednn_weight_;  // W as given or transposed (plain), or stored (oneDNN)
  std::unique_ptr<PackedBuffer> packed_;  // or packed
  int64_t k_, n_, rows_;
};

// tanh in place over n contiguous values.
#if AT_MKL_ENABLED()
inline void tanh_inplace(float* x, int64_t n) { vsTanh(n, x, x); }
inline void tanh_inplace(double* x, int64_t n) { vdTanh(n, x, x); }
#else
template <typename scalar_t>
void tanh_inplace(scalar_t* x, int64_t n) {
  using V = Vectorized<scalar_t>;
  for (int64_t j = 0; j < n; j += V::size()) {
    const int count = static_cast<int>(std::min<int64_t>(V::size(), n - j));
    V::loadu(x + j, count).tanh().store(x + j, count);
  }
}
#endif

template <typename scalar_t>
inline Vectorized<scalar_t> sigmoid(const Vectorized<scalar_t>& x) {
  // 1 / (1 + exp(-x)): exp overflows to inf for very negative x, giving exactly 0, never NaN.
  const Vectorized<scalar_t> one(scalar_t(1));
  return one / (one + x.neg().exp());
}

// body(b, j, count) over rows [b0, b1) of width H, count (<= the vector width) columns from j.
template <typename scalar_t, typename Body>
inline void each_vector(int64_t b0, int64_t b1, int64_t H, const Body& body) {
  constexpr int64_t width = Vectorized<scalar_t>::size();
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t j = 0; j < H; j += width) body(b, j, static_cast<int>(std::min<int64_t>(width, H - j)));
}

// fn(b0, b1) over the B rows of a step, split across threads in chunks of at least ~4096 values, so
// that small steps stay on one thread. (Only where the extension is compiled with OpenMP: without it
// at::parallel_for runs the whole range on the calling thread.)
template <typename Fn>
inline void over_rows(int64_t B, int64_t H, const Fn& fn) {
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)), fn);
}

// ---- one step's element-wise work, for rows [b0, b1) ---------------------------------------------------

// r = (h * w_hh if independent else r) + b_hh, in place;  m = (p_m + bias_m) r, and p_m + bias_m
// written to p_m_out when given (the tape)
template <typename scalar_t>
void mix_rows(int64_t b0, int64_t b1, int64_t H, scalar_t* r, const scalar_t* h, const scalar_t* w_hh_vector,
              const scalar_t* b_hh, const scalar_t* p_m, int64_t p_stride, const scalar_t* bias_m,
              scalar_t* p_m_out, int64_t p_m_out_stride, scalar_t* m) {
  using V = Vectorized<scalar_t>;
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * H + j;
    V v = w_hh_vector ? V::loadu(h + at, count) * V::loadu(w_hh_vector + j, count) : V::loadu(r + at, count);
    if (b_hh) v = v + V::loadu(b_hh + j, count);
    v.store(r + at, count);
    V projection = V::loadu(p_m + b * p_stride + j, count);
    if (bias_m) projection = projection + V::loadu(bias_m + j, count);
    if (p_m_out) projection.store(p_m_out + b * p_m_out_stride + j, count);
    (projection * v).store(m + at, count);
  });
}

// (i, o, f, z) = (sigmoid, sigmoid, sigmoid, tanh)(a), with a = pre * (pg + bias_g) under multiplicative
// integration and pre + pg + bias_g under addition (pg + bias_g is written back into pg when
// keep_pg, for the tape); c = f c_prev + i z; h = o tanh(c). When K is given, also
// the factors of the backward that do not depend on the incoming gradient:
//   K = (z i(1-i), tanh(c) o(1-o), c_prev f(1-f), i(1-z^2)),  dh_to_dc = o(1 - tanh(c)^2),  f_out = f.
// zt and tc are (B, H) scratch for z and tanh(c), contiguous so that tanh runs over whole rows.
template <typename scalar_t>
void gate_rows(int64_t b0, int64_t b1, int64_t H, const scalar_t* pre, scalar_t* pg, int64_t pg_stride,
               const scalar_t* bias_g, bool keep_pg, bool multiplicative, const scalar_t* c_prev, scalar_t* c,
               scalar_t* h, scalar_t* zt, scalar_t* tc, scalar_t* K, scalar_t* dh_to_dc, scalar_t* f_out) {
  using V = Vectorized<scalar_t>;
  const V one(scalar_t(1));
  auto gate = [&](int64_t b, int64_t block, int64_t j, int count) {  // called once per block and column
    const V a = V::loadu(pre + b * 4 * H + block * H + j, count);
    scalar_t* g_at = pg + b * pg_stride + block * H + j;
    V g = V::loadu(g_at, count);
    if (bias_g) g = g + V::loadu(bias_g + block * H + j, count);
    if (keep_pg) g.store(g_at, count);
    return multiplicative ? a * g : a + g;
  };
  const int64_t first = b0 * H, n = (b1 - b0) * H;
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    gate(b, 3, j, count).store(zt + b * H + j, count);
  });
  tanh_inplace(zt + first, n);
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * H + j;
    const V i = sigmoid(gate(b, 0, j, count)), f = sigmoid(gate(b, 2, j, count));
    const V c_new = f * V::loadu(c_prev + at, count) + i * V::loadu(zt + at, count);
    c_new.store(c + at, count);
    c_new.store(tc + at, count);
    if (K) {  // kept for the pass below: i where K's last block goes, f in its place on the tape
      i.store(K + b * 4 * H + 3 * H + j, count);
      f.store(f_out + at, count);
    }
  });
  tanh_inplace(tc + first, n);
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * H + j;
    const V o = sigmoid(gate(b, 1, j, count)), t = V::loadu(tc + at, count);
    (o * t).store(h + at, count);
    if (!K) return;
    scalar_t* k_row = K + b * 4 * H;
    const V i = V::loadu(k_row + 3 * H + j, count), f = V::loadu(f_out + at, count);
    const V z = V::loadu(zt + at, count);
    (z * i * (one - i)).store(k_row + j, count);
    (t * o * (one - o)).store(k_row + H + j, count);
    (V::loadu(c_prev + at, count) * f * (one - f)).store(k_row + 2 * H + j, count);
    (i * (one - z * z)).store(k_row + 3 * H + j, count);
    (o * (one - t * t)).store(dh_to_dc + at, count);
  });
}

// With d_h = d_hs + extra (d_hs null: zero), where extra is d_r_next * w_hh (an independent, vector
// w_hh) or a given (B, H) array (d_r_next W_hh, or d_hT at the last step), and D = (d_c, d_h, d_c, d_c):
//   d_c = d_c f_next + d_h dh_to_dc  (in place; f_next is null at the last step)
//   d_a = K D, the gradient of the gate pre-activations a = p_gates + q (addition) or p_gates q
//   (multiplicative: then d_p_gates = d_a q and d_q = d_a p_gates; under addition both are d_a).
// d_p_gates goes to rows of stride d_p_stride, d_q (when given) to (B, 4H) rows.
template <typename scalar_t>
void backward_rows(int64_t b0, int64_t b1, int64_t H, const scalar_t* d_hs, const scalar_t* extra,
                   const scalar_t* w_hh_vector, scalar_t* d_c, const scalar_t* f_next, const scalar_t* dh_to_dc,
                   const scalar_t* K, scalar_t* d_p_gates, int64_t d_p_stride, const scalar_t* pg,
                   int64_t pg_stride, const scalar_t* q, scalar_t* d_q) {
  using V = Vectorized<scalar_t>;
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * H + j;
    V dh = V::loadu(extra + at, count);
    if (w_hh_vector) dh = dh * V::loadu(w_hh_vector + j, count);
    if (d_hs) dh = dh + V::loadu(d_hs + at, count);
    V dc = V::loadu(d_c + at, count);
    if (f_next) dc = dc * V::loadu(f_next + at, count);
    dc = dc + dh * V::loadu(dh_to_dc + at, count);
    dc.store(d_c + at, count);
    for (int64_t block = 0; block < 4; ++block) {
      const int64_t col = block * H + j, row_col = b * 4 * H + col;
      const V d = V::loadu(K + row_col, count) * (block == 1 ? dh : dc);
      if (q) {
        (d * V::loadu(q + row_col, count)).store(d_p_gates + b * d_p_stride + col, count);
        (d * V::loadu(pg + b * pg_stride + col, count)).store(d_q + row_col, count);
      } else {
        d.store(d_p_gates + b * d_p_stride + col, count);
      }
    }
  });
}

// d_r = d_m p_m and d_p_m = d_m r, from one step's d_m (B, H); p_m and d_p_m are rows of the given strides
template <typename scalar_t>
void mix_backward_rows(int64_t b0, int64_t b1, int64_t H, const scalar_t* d_m, const scalar_t* p_m,
                       int64_t p_stride, const scalar_t* r, scalar_t* d_r, scalar_t* d_p_m, int64_t d_p_stride) {
  using V = Vectorized<scalar_t>;
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * H + j;
    const V dm = V::loadu(d_m + at, count);
    (dm * V::loadu(p_m + b * p_stride + j, count)).store(d_r + at, count);
    (dm * V::loadu(r + at, count)).store(d_p_m + b * d_p_stride + j, count);
  });
}

// Where a reverse loop starts: the incoming gradient of a final state, or zeros where none was given.
void start_from(const std::optional<Tensor>& given, Tensor& into) {
  if (given) into.copy_(*given);
  else into.zero_();
}

std::optional<Tensor> contiguous(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(t->contiguous()) : std::nullopt;
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const std::optional<Tensor>& t) {
  return t ? t->data_ptr<scalar_t>() : nullptr;
}

Tensor empty0(const Tensor& like) { return at::empty({0}, like.options()); }

// ---- memory kept from call to call for a training call's large arrays ---------------------------------

// The tape of a forward that keeps one (its K alone holds T*B*4H values: 52 MB at the large benchmark
// size) and the backward's scratch are too large for glibc to hold on to: it hands such a block back to
// the system when it is freed, and the next call's first writes fault every 4 KB page in again, each
// zeroed by the kernel (~32,000 faults per forward+backward there). So these arrays come from blocks
// kept process-wide: a block goes back to the pool when the last tensor on it is freed (the tape's when
// autograd frees it after the backward) and serves a later array of up to its size. Free blocks are
// kept up to MLSTM_TORCH_KEPT_MEGABYTES (read once; default 512, 0: none kept); to keep a freed block
// within that, the blocks freed longest ago go back to the system first (so that the pool follows the
// shapes of the calls now running), and a block larger than the bound goes back itself. Only for
// arrays no user sees: outputs and gradients stay ordinary tensors.
class KeptBlocks {
 public:
  static Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(shape)) * options.dtype().itemsize();
    KeptBlocks& pool = instance();
    if (bytes < kSmallest || pool.limit_ == 0) return at::empty(shape, options);
    const auto [block, size] = pool.take((bytes + kGranule - 1) / kGranule * kGranule);
    return at::from_blob(block, shape, [size = size](void* freed) { instance().give_back(freed, size); }, options);
  }
  // The bytes held in free blocks now (for the tests).
  static size_t free_bytes() {
    KeptBlocks& pool = instance();
    std::lock_guard<std::mutex> guard(pool.mutex_);
    return pool.free_total_;
  }

 private:
  static constexpr size_t kSmallest = size_t{1} << 20, kGranule = size_t{2} << 20;
  KeptBlocks() {
    const char* setting = std::getenv("MLSTM_TORCH_KEPT_MEGABYTES");
    limit_ = (setting ? static_cast<size_t>(std::max(0LL, std::atoll(setting))) : 512) << 20;
  }
  static KeptBlocks& instance() {  // never destroyed: a tensor freed during exit still finds it
    static KeptBlocks* pool = new KeptBlocks();
    return *pool;
  }
  // The smallest free block of at least `size` bytes and at most an eighth (or a granule) larger, else a
  // new one; with its size.
  std::pair<void*, size_t> take(size_t size) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      const auto found = free_.lower_bound(size);
      if (found != free_.end() && found->first <= size + std::max(size / 8, kGranule)) {
        const std::pair<void*, size_t> block{found->second.first, found->first};
        free_total_ -= found->first;
        free_.erase(found);
        return block;
      }
    }
    void* block = std::aligned_alloc(64, size);
    if (!block) throw std::bad_alloc();
    return {block, size};
  }
  void give_back(void* block, size_t size) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (size > limit_) {
      std::free(block);
      return;
    }
    while (free_total_ + size > limit_) {  // the oldest free block out (few blocks: a scan is enough)
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second.second < oldest->second.second) oldest = it;
      std::free(oldest->second.first);
      free_total_ -= oldest->first;
      free_.erase(oldest);
    }
    free_.emplace(size, std::make_pair(block, ++freed_));
    free_total_ += size;
  }
  std::mutex mutex_;
  std::multimap<size_t, std::pair<void*, uint64_t>> free_;  // size -> (block, when it was freed)
  size_t free_total_ = 0, limit_ = 0;
  uint64_t freed_ = 0;
};

// Scratch arrays that no result aliases, carved from one buffer that this thread keeps from call to
// call (one per dtype; it grows to the largest call's needs, up to kKeptBytes; a call needing more
// takes its buffer from KeptBlocks). A fresh allocation of that size costs a page fault per 4 KB on every
// call, as glibc hands large blocks back to the system: measured ~4 ms of a 21 ms forward at B=32,
// T=128, I=64, H=256. The forward's scratch is bounded by the projection chunk (a few MB); the
// backward's grows with T*B*H.
constexpr int64_t kKeptBytes = 64 << 20;
class Scratch {
 public:
  // A call's arrays come from the kept buffer of a slot: the loops', or weight_gradient's transposes
  // (which run while the loops' arrays are still in use).
  enum Slot { kLoops = 0, kTransposes = 1 };
  explicit Scratch(const at::TensorOptions& options, Slot slot = kLoops) : options_(options), slot_(slot) {}
  // reserve(shape) for every array first, then take(shape) for each, in the same order
  void reserve(at::IntArrayRef shape) { total_ += padded(shape); }
  Tensor take(at::IntArrayRef shape) {
    if (!buffer_.defined()) {
      thread_local Tensor kept[2][2];  // by slot: float32, float64
      Tensor& mine = kept[slot_][options_.dtype() == at::kDouble ? 1 : 0];
      const bool keep = total_ * static_cast<int64_t>(options_.dtype().itemsize()) <= kKeptBytes;
      if (!keep) buffer_ = KeptBlocks::empty({total_}, options_);  // too large for this thread: from the pool
      else if (!mine.defined() || mine.numel() < total_) {
        // Kept across calls, so it must not become an inference tensor when the first call runs under
        // torch.inference_mode(): a later call outside it could then not write to it.
        c10::InferenceMode normal_tensor(/*enabled=*/false);
        mine = at::empty({total_}, options_);
      }
      if (keep) buffer_ = mine;
    }
    Tensor view = buffer_.narrow(0, offset_, c10::multiply_integers(shape)).view(shape);
    offset_ += padded(shape);
    return view;
  }

 private:
  static int64_t padded(at::IntArrayRef shape) {  // whole 64-byte lines, so every array stays aligned
    return (c10::multiply_integers(shape) + 15) / 16 * 16;
  }
  at::TensorOptions options_;
  Slot slot_;
  Tensor buffer_;
  int64_t total_ = 0, offset_ = 0;
};

// ---- the weight gradients ------------------------------------------------------------------------------

// A^T B for A (rows x n) and B (rows x k), rows spanning a whole sequence (T * B): the weight
// gradients. The product runs along the rows, so oneDNN's linear (X W^T, k contiguous) needs both
// operands transposed first; sequence_product's choice does not carry over. MKL (at::mm) or oneDNN,
// whichever measured faster for (n, k) and the thread count, once per process on 1024-row operands,
// transposes included: MKL unless oneDNN is over 10% faster. Measured here (Intel Xeon, 2 threads, the
// large benchmark's 6400 x 2560 by 6400 x 512): MKL 125 G multiply-adds/s, oneDNN 127 on operands
// already transposed; with MKL held to AVX2 MKL 67. So the transposes must be cheap (transpose_into;
// oneDNN, given transposed views, copies them as slowly as torch does: 145 ms in all). They go
// kGradientChunkRows rows at a time into a scratch buffer kept from call to call, so they fault no
// fresh pages in.
// MLSTM_TORCH_STEP_GEMM (see step_product) fixes this choice too: oneDNN for =onednn, MKL otherwise.
constexpr int64_t kGradientChunkRows = 1024;

bool weight_gradient_on_onednn(int64_t n, int64_t k, const at::TensorOptions& options) {
#if AT_MKL_ENABLED()
  if (options.dtype() != at::kFloat || !onednn()) return false;
  const std::tuple<int64_t, int64_t, int> key{n, k, at::get_num_threads()};
  if (const auto known = fixed_or_kept(gradient_choices, key)) return *known;
  constexpr int64_t kRows = 1024;
  const Tensor a = at::ones({kRows, n}, options), b = at::ones({kRows, k}, options);
  auto mkl_product = [&] { at::mm(a.t(), b); };
  Tensor a_t = at::empty({n, kRows}, options), b_t = at::empty({k, kRows}, options);
  auto onednn_product_of_transposes = [&] {
    transpose_into<float>(a, a_t);
    transpose_into<float>(b, b_t);
    onednn_linear(a_t, b_t);
  };
  return remember(gradient_choices, key, onednn_is_faster(mkl_product, onednn_product_of_transposes, 3),
                  /*fixed=*/false);
#else
  return false;
#endif
}

Tensor weight_gradient(const Tensor& a, const Tensor& b) {
  const int64_t rows = a.size(0), n = a.size(1), k = b.size(1);
  if (rows == 0 || !weight_gradient_on_onednn(n, k, a.options())) return at::mm(a.t(), b);
  // in chunks of rows, so that the transposed operands fit a kept scratch buffer (no page faults)
  const int64_t chunk = std::min<int64_t>(rows, kGradientChunkRows);
  Scratch scratch(a.options(), Scratch::kTransposes);
  scratch.reserve({n * chunk});
  scratch.reserve({k * chunk});
  const Tensor a_space = scratch.take({n * chunk}), b_space = scratch.take({k * chunk});
  Tensor out;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t count = std::min(chunk, rows - r0);
    const Tensor a_t = a_space.narrow(0, 0, n * count).view({n, count});
    const Tensor b_t = b_space.narrow(0, 0, k * count).view({k, count});
    transpose_into<float>(a.narrow(0, r0, count), a_t);
    transpose_into<float>(b.narrow(0, r0, count), b_t);
    const Tensor part = onednn_linear(a_t, b_t);
    if (out.defined()) out.add_(part);
    else out = part;
  }
  return out;
}

// ---- the forward without a tape, one slice of the batch per thread -------------------------------------

// While it lives, MKL's and oneDNN's products called from this thread run on this thread alone; then
// its settings are restored.
class OneThread {
 public:
  OneThread() {
#if AT_MKL_ENABLED()
    const int one = 1;
    mkl_before_ = mkl_set_num_threads_local_(&one);
#endif
    if (const OpenMpThreads* omp = openmp_threads()) {
      omp_before_ = omp->get();
      omp->set(1);
    }
  }
  ~OneThread() {
#if AT_MKL_ENABLED()
    mkl_set_num_threads_local_(&mkl_before_);
#endif
    if (const OpenMpThreads* omp = openmp_threads()) omp->set(omp_before_);
  }

 private:
  int mkl_before_ = 0, omp_before_ = 1;
};

// body(s) for every s in [0, count), on the calling thread and count - 1 tasks of torch's inter-op thread
// pool (at::launch), rather than at::parallel_for: where this file is compiled without OpenMP (see
// openmp() in build.py) at::parallel_for runs everything on the calling thread. The caller also runs
// every slice no task has claimed yet, so it never waits for a task that has not started (the pool may
// be busy, or be this thread).
template <typename Body>
void run_on_threads(int64_t count, const Body& body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    int64_t finished = 0;
    std::mutex mutex;
    std::condition_variable all_finished;
    std::exception_ptr error;
  };
  auto shared = std::make_shared<Shared>();
  // A task may start after the caller has returned: it then finds nothing to claim and never calls body.
  auto work = [shared, count, &body] {
    for (int64_t s; (s = shared->next.fetch_add(1)) < count;) {
      std::exception_ptr error;
      try {
        body(s);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> guard(shared->mutex);
      if (error && !shared->error) shared->error = error;
      if (++shared->finished == count) shared->all_finished.notify_all();
    }
  };
  for (int64_t task = 1; task < count; ++task) at::launch(work);
  work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_finished.wait(lock, [&] { return shared->finished == count; });
  if (shared->error) std::rethrow_exception(shared->error);
}

// The slices a forward splits the batch into: one per torch thread, each of at least kMinSliceRows
// rows (fewer make each thread's products inefficient); 1 keeps the step-parallel loop, as does
// MLSTM_TORCH_FORWARD_SLICES=off (read at every call; for comparing the two, and for a processor where
// slices measure slower), and so does a forward whose tape keeps every step's whole projection (under
// multiplicative integration: a slice computes its projections a chunk at a time, into its own ring).
// Without MKL, whose products can be told to stay on the calling thread, always 1.
constexpr int64_t kMinSliceRows = 8;
int64_t forward_slices(int64_t B, bool keeps_projections) {
#if AT_MKL_ENABLED()
  const char* setting = std::getenv("MLSTM_TORCH_FORWARD_SLICES");
  if (keeps_projections || (setting && std::string(setting) == "off")) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kMinSliceRows));
#else
  return 1;
#endif
}

// What the last sliced forward of this process did, slice by slice: its rows, how many of its chunks'
// projections another slice's thread computed, and when it finished (seconds after the call began).
// For bench_torch.py and the tests; last_sliced_forward() returns it.
struct SliceRecord {
  int64_t rows, projections_by_others;
  double finished;
};
std::mutex last_sliced_mutex;
std::vector<SliceRecord> last_sliced;

// Whether the threads of a sliced forward compute projections for one another (see below):
// MLSTM_TORCH_FORWARD_HELP=off (read at every call) keeps each to its own, for comparing the two.
bool forward_help() {
  const char* setting = std::getenv("MLSTM_TORCH_FORWARD_HELP");
  return !(setting && std::string(setting) == "off");
}

// A piece of work any thread of a sliced forward may do, once: free to take, being done, or done.
enum : int { kFree = 0, kTaken = 1, kDone = 2 };

// Does work() here if no thread has taken it (state free: taken with one compare-and-swap, done after);
// whether it did. Where work() throws, the piece is free again, for a thread that then meets the error
// itself.
template <typename Work>
bool run_if_free(std::atomic<int>& state, const Work& work) {
  int expected = kFree;
  if (!state.compare_exchange_strong(expected, kTaken)) return false;
  try {
    work();
  } catch (...) {
    state.store(kFree);
    throw;
  }
  state.store(kDone, std::memory_order_release);
  return true;
}

// layer_forward (with a tape only under addition: see forward_slices), with the batch split into
// `slices` row ranges that are independent through the whole recurrence: each thread runs every step for its rows, with single-threaded
// products, so a step needs no fork and join (layer_forward's own loop has MKL fork and join its
// threads twice a step), and the thread's projection chunk, h and c stay in its own core's cache. The
// same products and passes as that loop, on fewer rows; the input projection is one product per chunk
// of steps on a weight packed once per call (where measured faster, as for the per-step products).
//
// A slice's projection of a chunk does not depend on the recurrence, so any thread can compute it
// before the slice needs it. A thread that starts a chunk while another slice is still on an earlier
// one first computes that slice's projection of one of its next two chunks, if no thread has taken it
// yet (a slice keeps three chunks' projections: the one it is on and the next two); a thread done with
// its own rows goes on doing so while the others run. So a faster core takes over part of a slower
// one's work (the projection is about half the multiply-adds where inputs and hidden units are equally
// many) without the threads ever waiting for one another at a barrier. Cores are not equally fast for
// long: on this project's 2-vCPU VM one vCPU ran single-threaded products at 0.7-0.9x the other's rate
// for seconds at a time (host contention), and hybrid processors pair fast and slow cores; with a fixed
// share each, the faster thread waited for the slower one at the end of every call. A chunk's values do
// not depend on the thread that computed them: the slices of one row count share one packed weight.
std::vector<Tensor> sliced_layer_forward(const Tensor& x_given, const Tensor& h0, const Tensor& c0,
                                         const Tensor& w_ih, const Tensor& w_hh, const Tensor& w_mh,
                                         const std::optional<Tensor>& bias, const std::optional<Tensor>& b_hh,
                                         const std::optional<Tensor>& b_mh, bool multiplicative, bool keep_tape,
                                         int64_t chunk_bytes, int64_t slices) {
  TORCH_INTERNAL_ASSERT(!(keep_tape && multiplicative));  // see forward_slices
  const auto call_start = std::chrono::steady_clock::now();
  const Tensor x = x_given.contiguous();
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(-1);
  const int64_t base_rows = B / slices, extra_rows = B % slices, most_rows = base_rows + (extra_rows > 0);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(T, chunk_bytes / (B * 5 * H * x.element_size())));
  const int64_t chunks = (T + chunk - 1) / chunk;
  constexpr int64_t kRing = 3;  // projections kept per slice: of the chunk it is on, and of the next two
  Scratch scratch(x.options());
  const std::vector<int64_t> p_shape{slices, kRing, chunk * most_rows, 5 * H}, x_shape{slices, chunk * most_rows, I},
      rows_shape{slices, most_rows, H}, gates_shape{slices, most_rows, 4 * H}, c_shape{slices, 2, most_rows, H};
  for (const auto& shape : {p_shape, x_shape, rows_shape, rows_shape, gates_shape, rows_shape, rows_shape, c_shape})
    scratch.reserve(shape);
  Tensor p_all = scratch.take(p_shape), x_all = scratch.take(x_shape);
  Tensor r_all = scratch.take(rows_shape), m_all = scratch.take(rows_shape), pre_all = scratch.take(gates_shape);
  Tensor z_all = scratch.take(rows_shape), tanh_c_all = scratch.take(rows_shape), c_all = scratch.take(c_shape);
  Tensor hs = at::empty({T, B, H}, x.options()), c_T = at::empty({B, H}, x.options());
  // The tape, as layer_forward's under addition: p_m plus its bias, r, m, f, K and dh_to_dc for every
  // step; each slice writes its rows.
  auto tape_array = [&](int64_t width) { return keep_tape ? KeptBlocks::empty({T, B, width}, x.options()) : empty0(x); };
  Tensor p_m_tape = tape_array(H), r_tape = tape_array(H), m_tape = tape_array(H), f_tape = tape_array(H);
  Tensor K = tape_array(4 * H), dh_to_dc = tape_array(H);
  const bool independent = w_hh.dim() == 1;
  const Tensor w_hh_c = w_hh.contiguous(), w_mh_c = w_mh.contiguous(), w_ih_c = w_ih.contiguous();
  const Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
  const bool help_others = forward_help();
  auto first_row = [&](int64_t s) { return s * base_rows + std::min(s, extra_rows); };
  auto row_count = [&](int64_t s) { return base_rows + (s < extra_rows); };
  // Each slice's chunk projections (free to take, being computed, or done: see run_if_free); the chunk
  // each slice is on (-1: not started; chunks: finished).
  std::unique_ptr<std::atomic<int>[]> projection(new std::atomic<int>[slices * chunks]);
  std::unique_ptr<std::atomic<int64_t>[]> on_chunk(new std::atomic<int64_t>[slices]);
  for (int64_t i = 0; i < slices * chunks; ++i) projection[i].store(kFree);
  for (int64_t s = 0; s < slices; ++s) on_chunk[s].store(-1);
  std::vector<SliceRecord> record(slices);
  for (int64_t s = 0; s < slices; ++s) record[s] = {row_count(s), 0, 0.0};
  std::vector<int64_t> computed_by(slices * chunks, -1);  // the slice whose thread computed each projection

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlstm_sliced_layer_forward", [&] {
    const scalar_t* b_hh_p = ptr_or_null<scalar_t>(b_hh);
    const scalar_t* bias_p = ptr_or_null<scalar_t>(bias);  // (5H): bias_ih, plus bias_mh under addition
    const scalar_t* b_mh_p = multiplicative ? ptr_or_null<scalar_t>(b_mh) : nullptr;
    const scalar_t* w_hh_vector = independent ? w_hh_c.data_ptr<scalar_t>() : nullptr;
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    auto projection_of = [&](int64_t s, int64_t k) { return p_all[s][k % kRing].template data_ptr<scalar_t>(); };
    // The weights of the products, packed (where measured faster) for a row count: one set for the
    // slices of most_rows rows and one for those of base_rows where that differs, each weight prepared
    // by whichever thread claims it first and then shared by every slice with those rows. One copy
    // instead of one per thread: half the packing per thread, and half the weights' footprint in the
    // shared cache (the step products ran at 1.04x the rate with one shared copy in a two-thread
    // measurement here, median of 24 alternated runs). The input projection's weight is packed for whole
    // chunks where a call has two or more to amortise it over; else (and for a last, shorter chunk)
    // plain products. So only one projection shape per (B, H) is ever measured.
    enum Job : int { kHh = 0, kMh = 1, kIh = 2, kJobs = 3 };
    const int64_t row_sets = most_rows == base_rows ? 1 : 2;
    std::vector<std::array<std::optional<StepWeight<scalar_t>>, kJobs>> packed(row_sets);
    std::unique_ptr<std::atomic<int>[]> packing(new std::atomic<int>[row_sets * kJobs]);
    for (int64_t i = 0; i < row_sets * kJobs; ++i) packing[i].store(kFree);
    auto set_of = [&](int64_t rows) { return rows == most_rows ? 0 : 1; };
    // Prepares weight `job` for row set g here if no thread has taken it yet; whether it did.
    auto prepare = [&](int64_t g, int job) {
      return run_if_free(packing[g * kJobs + job], [&] {
        const int64_t rows = g == 0 ? most_rows : base_rows;
        if (job == kHh && !independent) packed[g][job].emplace(w_hh_c, rows, /*stored=*/true);
        if (job == kMh) packed[g][job].emplace(w_mh_c, rows, /*stored=*/true);
        if (job == kIh && T >= 2 * chunk) packed[g][job].emplace(w_ih_c, chunk * rows, /*stored=*/true);
      });
    };
    auto run_slice = [&](int64_t me) {
      const int64_t b0 = first_row(me), rows = row_count(me), g = set_of(rows);
      // Every weight nobody has taken yet, this slice's set first, each thread starting at another weight
      // (threads that start together then pack side by side); then this slice's, once ready.
      for (int64_t i = 0; i < row_sets * kJobs; ++i) {
        const int64_t job = (g * kJobs + me + i) % (row_sets * kJobs);
        prepare(job / kJobs, static_cast<int>(job % kJobs));
      }
      for (int job = 0; job < kJobs; ++job)
        while (packing[g * kJobs + job].load(std::memory_order_acquire) != kDone && !prepare(g, job))
          std::this_thread::yield();
      const std::optional<StepWeight<scalar_t>>& w_hh_step = packed[g][kHh];
      const StepWeight<scalar_t>& w_mh_step = *packed[g][kMh];
      const std::optional<StepWeight<scalar_t>>& w_ih_chunk = packed[g][kIh];
      scalar_t* x_slice = x_all[me].data_ptr<scalar_t>();
      // Computes slice s's projection of chunk k here if no thread has taken it yet: the rows' inputs of
      // the chunk side by side, then one product. Only for slices with as many rows as this one, so that
      // it runs on the same packed weight as theirs (same values, bit for bit).
      auto project = [&](int64_t s, int64_t k) {
        return run_if_free(projection[s * chunks + k], [&] {
          const int64_t s0 = first_row(s), s_rows = row_count(s), t0 = k * chunk, n = std::min(chunk, T - t0);
          for (int64_t step = 0; step < n; ++step) {
            const scalar_t* from = x_p + ((t0 + step) * B + s0) * I;
            std::copy(from, from + s_rows * I, x_slice + step * s_rows * I);
          }
          scalar_t* p = projection_of(s, k);
          if (w_ih_chunk && n == chunk) w_ih_chunk->multiply(x_slice, I, false, p, 5 * H);
          else gemm<scalar_t>(n * s_rows, 5 * H, I, x_slice, I, w_ih_c.data_ptr<scalar_t>(), I, false, p, 5 * H,
                              /*b_stored=*/true);
          computed_by[s * chunks + k] = me;
        });
      };
      // Computes, for the slice furthest behind chunk k, the first of its next two chunks' projections
      // that no thread has taken; whether it computed one.
      auto help = [&](int64_t k) {
        if (!help_others) return false;
        int64_t behind = -1, behind_on = k;
        for (int64_t s = 0; s < slices; ++s) {
          const int64_t on = on_chunk[s].load(std::memory_order_acquire);
          if (s != me && row_count(s) == rows && on < behind_on) behind = s, behind_on = on;
        }
        for (int64_t ahead = behind_on + 1; behind >= 0 && ahead < std::min(chunks, behind_on + kRing); ++ahead)
          if (project(behind, ahead)) return true;
        return false;
      };
      scalar_t* r = r_all[me].data_ptr<scalar_t>();
      scalar_t* m = m_all[me].data_ptr<scalar_t>();
      scalar_t* pre = pre_all[me].data_ptr<scalar_t>();
      scalar_t* zt = z_all[me].data_ptr<scalar_t>();
      scalar_t* tc = tanh_c_all[me].data_ptr<scalar_t>();
      scalar_t* cs = c_all[me].data_ptr<scalar_t>();  // c_{t-1} and c_t, alternating, most_rows apart
      const scalar_t* c0_rows = c0c.data_ptr<scalar_t>() + b0 * H;
      std::copy(c0_rows, c0_rows + rows * H, cs);
      scalar_t* hs_p = hs.data_ptr<scalar_t>();
      const scalar_t* h_prev = h0c.data_ptr<scalar_t>() + b0 * H;
      // The tape's arrays (null where the forward keeps none), each (T, B, width)
      auto tape_of = [&](Tensor& array) { return keep_tape ? array.data_ptr<scalar_t>() : nullptr; };
      scalar_t *const p_m_tape_p = tape_of(p_m_tape), *const r_tape_p = tape_of(r_tape), *const m_tape_p = tape_of(m_tape);
      scalar_t *const f_tape_p = tape_of(f_tape), *const K_p = tape_of(K), *const dh_to_dc_p = tape_of(dh_to_dc);
      for (int64_t k = 0; k < chunks; ++k) {
        on_chunk[me].store(k, std::memory_order_release);
        // Taken by another thread: done, or done within one product (or freed again if that one failed).
        while (!project(me, k) && projection[me * chunks + k].load(std::memory_order_acquire) != kDone)
          std::this_thread::yield();
        help(k);
        scalar_t* p_chunk = projection_of(me, k);
        for (int64_t t = k * chunk; t < std::min(T, (k + 1) * chunk); ++t) {
          scalar_t* p_t = p_chunk + (t - k * chunk) * rows * 5 * H;
          const scalar_t* c_prev = cs + (t % 2) * most_rows * H;
          scalar_t* c = cs + ((t + 1) % 2) * most_rows * H;
          const int64_t at_rows = t * B + b0;  // this step's first row of this slice, in (T, B, .) arrays
          scalar_t* h = hs_p + at_rows * H;
          // this step's rows on the tape where the forward keeps one, else in this slice's scratch
          auto on_tape = [&](scalar_t* tape, int64_t width, scalar_t* scratch_rows) {
            return tape ? tape + at_rows * width : scratch_rows;
          };
          scalar_t* r_t = on_tape(r_tape_p, H, r);
          scalar_t* m_t = on_tape(m_tape_p, H, m);
          if (!independent) w_hh_step->multiply(h_prev, H, false, r_t, H);
          mix_rows<scalar_t>(0, rows, H, r_t, h_prev, w_hh_vector, b_hh_p, p_t, 5 * H, bias_p,
                             on_tape(p_m_tape_p, H, nullptr), H, m_t);
          if (b_mh_p)
            for (int64_t b = 0; b < rows; ++b) std::copy(b_mh_p, b_mh_p + 4 * H, pre + b * 4 * H);
          w_mh_step.multiply(m_t, H, b_mh_p != nullptr, pre, 4 * H);
          gate_rows<scalar_t>(0, rows, H, pre, p_t + H, 5 * H, bias_p ? bias_p + H : nullptr, false, multiplicative,
                              c_prev, c, h, zt, tc, on_tape(K_p, 4 * H, nullptr), on_tape(dh_to_dc_p, H, nullptr),
                              on_tape(f_tape_p, H, nullptr));
          h_prev = h;
        }
      }
      on_chunk[me].store(chunks, std::memory_order_release);
      const scalar_t* c_last = cs + (T % 2) * most_rows * H;
      std::copy(c_last, c_last + rows * H, c_T.data_ptr<scalar_t>() + b0 * H);
      record[me].finished = std::chrono::duration<double>(std::chrono::steady_clock::now() - call_start).count();
      // Then the projections of the slices still running, waiting for them to come within reach while one
      // that no thread has taken is left. (Not for a slice no thread has started: the pool may never
      // start it, and this thread may be the one to run it next.)
      while (help_others) {
        if (help(chunks)) continue;
        bool left = false;
        for (int64_t s = 0; s < slices && !left; ++s) {
          const int64_t on = on_chunk[s].load(std::memory_order_acquire);
          for (int64_t k = on + 1; s != me && row_count(s) == rows && on >= 0 && k < chunks && !left; ++k)
            left = projection[s * chunks + k].load(std::memory_order_acquire) == kFree;
        }
        if (!left) break;
        std::this_thread::yield();
      }
    };
#if AT_MKL_ENABLED()
    if constexpr (std::is_same_v<scalar_t, float>) {
      // The packed-or-plain choices of this call's products, measured (once per process and shape) here,
      // with the other threads idle: measured inside the slices, each thread timed its products beside
      // the others' and the choice flipped from run to run.
      OneThread alone;
      for (const int64_t rows : {base_rows, most_rows}) {
        if (!independent) step_product(w_hh_c.data_ptr<float>(), rows, H, H);
        step_product(w_mh_c.data_ptr<float>(), rows, 4 * H, H);
        if (T >= 2 * chunk) step_product(w_ih_c.data_ptr<float>(), chunk * rows, 5 * H, I);
      }
    }
#endif
    run_on_threads(slices, [&](int64_t s) {
      OneThread alone;
      try {
        run_slice(s);
      } catch (...) {  // so that no thread waits for this slice's chunks
        on_chunk[s].store(chunks, std::memory_order_release);
        throw;
      }
    });
  });
  for (int64_t i = 0; i < slices * chunks; ++i)
    if (computed_by[i] != i / chunks) ++record[i / chunks].projections_by_others;
  {
    std::lock_guard<std::mutex> guard(last_sliced_mutex);
    last_sliced = record;
  }
  Tensor h_T = hs[T - 1].clone();
  if (keep_tape) return {hs, h_T, c_T, p_m_tape, r_tape, m_tape, f_tape, K, dh_to_dc, empty0(x)};
  std::vector<Tensor> out{hs, h_T, c_T};
  for (int n = 0; n < 7; ++n) out.push_back(empty0(x));
  return out;
}

// ---- the loops ------------------------------------------------------------------------------------------

std::vector<Tensor> layer_forward(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                  const Tensor& w_hh, const Tensor& w_mh, const std::optional<Tensor>& b_ih,
                                  const std::optional<Tensor>& b_hh_given, const std::optional<Tensor>& b_mh_given,
                                  bool multiplicative, bool keep_tape, int64_t chunk_bytes) {
  const std::optional<Tensor> b_hh = contiguous(b_hh_given), b_mh = contiguous(b_mh_given);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(-1);
  // The input projection is computed for many steps per matrix product, into one reused buffer of
  // about chunk_bytes. Its bias is added in the element-wise passes (an addmm would first copy it into
  // the whole buffer); under addition bias_mh joins it there, once per step instead of a third pass.
  std::optional<Tensor> bias = contiguous(b_ih);
  if (b_mh && !multiplicative) {
    Tensor folded = at::cat({at::zeros({H}, b_mh->options()), *b_mh});
    bias = bias ? *bias + folded : folded;
  }
  const int64_t slices = forward_slices(B, keep_tape && multiplicative);
  if (slices > 1)
    return sliced_layer_forward(x, h0, c0, w_ih, w_hh, w_mh, bias, b_hh, b_mh, multiplicative, keep_tape, chunk_bytes,
                                slices);
  auto empty = [&](at::IntArrayRef shape) { return at::empty(shape, x.options()); };
  auto tape_array = [&](at::IntArrayRef shape) { return KeptBlocks::empty(shape, x.options()); };
  const bool keep_all_p = keep_tape && multiplicative;  // the backward needs p_gates only then
  const int64_t chunk = keep_all_p ? T
      : std::max<int64_t>(1, std::min<int64_t>(T, chunk_bytes / (B * 5 * H * x.element_size())));
  // What the tape keeps comes from the kept blocks (autograd holds it; see KeptBlocks); the rest is scratch.
  Scratch scratch(x.options());
  const std::vector<int64_t> p_shape{chunk, B, 5 * H}, step_shape{1, B, H}, step_gates_shape{1, B, 4 * H};
  if (!keep_all_p) scratch.reserve(p_shape);
  if (!keep_tape) {
    scratch.reserve(step_shape);
    scratch.reserve(step_shape);
    if (multiplicative) scratch.reserve(step_gates_shape);
  }
  scratch.reserve({B, H});  // z
  scratch.reserve({B, H});  // tanh(c)
  scratch.reserve({B, 4 * H});
  scratch.reserve({2, B, H});
  Tensor p_buffer = keep_all_p ? tape_array({T, B, 5 * H}) : scratch.take(p_shape);
  Tensor p_m_tape = keep_tape && !multiplicative ? tape_array({T, B, H}) : empty0(x);
  Tensor hs = empty({T, B, H});
  Tensor r_all = keep_tape ? tape_array({T, B, H}) : scratch.take(step_shape);
  Tensor m_all = keep_tape ? tape_array({T, B, H}) : scratch.take(step_shape);
  Tensor q_all = !multiplicative ? empty0(x) : keep_tape ? tape_array({T, B, 4 * H}) : scratch.take(step_gates_shape);
  Tensor f_tape = keep_tape ? tape_array({T, B, H}) : empty0(x);
  Tensor K = keep_tape ? tape_array({T, B, 4 * H}) : empty0(x);
  Tensor dh_to_dc = keep_tape ? tape_array({T, B, H}) : empty0(x);
  Tensor z_scratch = scratch.take({B, H}), tanh_c_scratch = scratch.take({B, H});
  Tensor gates = scratch.take({B, 4 * H});
  Tensor cs = scratch.take({2, B, H});  // c_{t-1} and c_t, alternating
  cs[0].copy_(c0);
  const bool independent = w_hh.dim() == 1;
  // Transposed contiguous copies, so that each step's products are plain row-major ones.
  Tensor w_hh_t = independent ? w_hh.contiguous() : w_hh.t().contiguous();
  Tensor w_mh_t = w_mh.t().contiguous();
  Tensor w_ih_t = w_ih.t();
  Tensor h0c = h0.contiguous();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlstm_layer_forward", [&] {
    const scalar_t* b_hh_p = ptr_or_null<scalar_t>(b_hh);
    const scalar_t* bias_p = ptr_or_null<scalar_t>(bias);  // (5H): bias_ih, plus bias_mh under addition
    const scalar_t* b_mh_p = multiplicative ? ptr_or_null<scalar_t>(b_mh) : nullptr;
    const scalar_t* w_hh_p = w_hh_t.data_ptr<scalar_t>();  // the vector, under independent recurrence
    std::optional<StepWeight<scalar_t>> w_hh_step;
    if (!independent) w_hh_step.emplace(w_hh_t, B);
    const StepWeight<scalar_t> w_mh_step(w_mh_t, B);
    scalar_t* p_base = p_buffer.data_ptr<scalar_t>();
    const int64_t row = 5 * H, step_size = B * 5 * H;
    const scalar_t* h_prev = h0c.data_ptr<scalar_t>();
    const bool projection_on_onednn = sequence_product_on_onednn(w_ih);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t j = t % chunk;
      if (j == 0) {
        const int64_t n = std::min(chunk, T - t);
        Tensor x_rows = x.narrow(0, t, n).reshape({n * B, I});
        Tensor p_rows = p_buffer.narrow(0, 0, n).view({n * B, 5 * H});
        if (projection_on_onednn) p_rows.copy_(onednn_linear(x_rows, w_ih));
        else at::mm_out(p_rows, x_rows, w_ih_t);  // the bias is added in the element-wise passes
      }
      scalar_t* p_t = p_base + j * step_size;
      const int64_t k = keep_tape ? t : 0;
      // the tape keeps the biased projection: p_m alone under addition, all of p (in place) else
      scalar_t* p_m_out = !keep_tape ? nullptr : keep_all_p ? p_t : p_m_tape.data_ptr<scalar_t>() + t * B * H;
      const int64_t p_m_out_stride = keep_all_p ? row : H;
      scalar_t* r = r_all.data_ptr<scalar_t>() + k * B * H;
      scalar_t* m = m_all.data_ptr<scalar_t>() + k * B * H;
      const scalar_t* c_prev = cs.data_ptr<scalar_t>() + (t % 2) * B * H;
      scalar_t* c = cs.data_ptr<scalar_t>() + ((t + 1) % 2) * B * H;
      scalar_t* h = hs.data_ptr<scalar_t>() + t * B * H;
      if (!independent) w_hh_step->multiply(h_prev, H, false, r, H);
      over_rows(B, H, [&](int64_t b0, int64_t b1) {
        mix_rows<scalar_t>(b0, b1, H, r, h_prev, independent ? w_hh_p : nullptr, b_hh_p, p_t, row, bias_p,
                           p_m_out, p_m_out_stride, m);
      });
      scalar_t* pre = multiplicative ? q_all.data_ptr<scalar_t>() + k * B * 4 * H : gates.data_ptr<scalar_t>();
      if (b_mh_p)
        for (int64_t b = 0; b < B; ++b) std::copy(b_mh_p, b_mh_p + 4 * H, pre + b * 4 * H);
      w_mh_step.multiply(m, H, b_mh_p != nullptr, pre, 4 * H);
      scalar_t* K_t = keep_tape ? K.data_ptr<scalar_t>() + t * B * 4 * H : nullptr;
      scalar_t* dh_to_dc_t = keep_tape ? dh_to_dc.data_ptr<scalar_t>() + t * B * H : nullptr;
      scalar_t* f_t = keep_tape ? f_tape.data_ptr<scalar_t>() + t * B * H : nullptr;
      over_rows(B, H, [&](int64_t b0, int64_t b1) {
        gate_rows<scalar_t>(b0, b1, H, pre, p_t + H, row, bias_p ? bias_p + H : nullptr, keep_all_p,
                            multiplicative, c_prev, c, h,
                            z_scratch.data_ptr<scalar_t>(), tanh_c_scratch.data_ptr<scalar_t>(), K_t,
                            dh_to_dc_t, f_t);
      });
      h_prev = h;
    }
  });
  Tensor h_T = hs[T - 1].clone(), c_T = cs[T % 2].clone();
  if (!keep_tape) {
    std::vector<Tensor> out{hs, h_T, c_T};
    for (int n = 0; n < 7; ++n) out.push_back(empty0(x));
    return out;
  }
  Tensor p_tape = keep_all_p ? p_buffer : p_m_tape;
  return {hs, h_T, c_T, p_tape, r_all, m_all, f_tape, K, dh_to_dc, q_all};
}

// The gradients every layer's backward ends with, each one product or sum over all T*B rows (fresh
// tensors), from the per-step gradients of the input projection d_p (T, B, 5H), of W_mh m (+ b_mh) d_q
// (T, B, 4H) and of W_hh h (+ b_hh) d_r (T, B, H), with the multiplicative states m (T, B, H) and
// the outputs hs (T, B, P), h0 (B, P): those of x (when need_dx), h0, W_ih, W_hh, W_mh and the biases
// present (empty tensors for the others).
struct LayerGradients {
  Tensor d_x, d_h0, d_w_ih, d_w_hh, d_w_mh, d_b_ih, d_b_hh, d_b_mh;
};
LayerGradients layer_gradients(const Tensor& x, const Tensor& h0, const Tensor& hs, const Tensor& w_ih,
                               const Tensor& w_hh, const Tensor& d_p, const Tensor& d_q, const Tensor& d_r,
                               const Tensor& m, bool has_b_ih, bool has_b_hh, bool has_b_mh, bool need_dx) {
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = d_r.size(-1), P = hs.size(-1), rows = T * B;
  LayerGradients g;
  const Tensor d_r0 = d_r[0];
  const bool independent = w_hh.dim() == 1;
  g.d_h0 = independent ? d_r0 * w_hh : at::mm(d_r0, w_hh);
  const Tensor d_p2 = d_p.view({rows, 5 * H});
  g.d_x = need_dx ? sequence_product(d_p2, w_ih.t()).view({T, B, I}) : empty0(x);
  g.d_w_ih = weight_gradient(d_p2, x.reshape({rows, I}));
  const Tensor d_q2 = d_q.reshape({rows, 4 * H});
  g.d_w_mh = weight_gradient(d_q2, m.reshape({rows, H}));
  const Tensor d_r_rest = d_r.narrow(0, 1, T - 1).reshape({(T - 1) * B, H});
  const Tensor hs_prev = hs.narrow(0, 0, T - 1).reshape({(T - 1) * B, P});
  if (independent) {
    g.d_w_hh = (d_r0 * h0).sum(0);
    if (T > 1) g.d_w_hh.add_((d_r_rest * hs_prev).sum(0));
  } else {
    g.d_w_hh = weight_gradient(d_r0, h0);
    if (T > 1) g.d_w_hh.add_(weight_gradient(d_r_rest, hs_prev));
  }
  // bias gradients: column sums as matrix-vector products (2-3x faster than sum(0) here)
  const Tensor ones = at::ones({rows}, x.options());
  g.d_b_ih = has_b_ih ? at::mv(d_p2.t(), ones) : empty0(x);
  g.d_b_hh = has_b_hh ? at::mv(d_r.view({rows, H}).t(), ones) : empty0(x);
  g.d_b_mh = has_b_mh ? at::mv(d_q2.t(), ones) : empty0(x);
  return g;
}

// Back-propagation through time: the computation of backward_loop in backends/torch/loops.py, for
// its arguments, with the same nine results (empty tensors for gradients not asked for).
std::vector<Tensor> layer_backward(const std::optional<Tensor>& d_hs_given, const std::optional<Tensor>& d_hT,
                                   const std::optional<Tensor>& d_cT, const Tensor& x, const Tensor& h0,
                                   const Tensor& w_ih, const Tensor& w_hh, const Tensor& w_mh, bool has_b_ih,
                                   bool has_b_hh, bool has_b_mh, bool multiplicative, bool need_dx,
                                   const Tensor& hs, const Tensor& p, const Tensor& r_all, const Tensor& m_all,
                                   const Tensor& f, const Tensor& K, const Tensor& dh_to_dc, const Tensor& q_all) {
  const int64_t T = x.size(0), B = x.size(1), H = h0.size(-1);
  const bool independent = w_hh.dim() == 1;
  Scratch scratch(x.options());
  const std::vector<int64_t> d_p_shape{T, B, 5 * H}, d_q_shape{T, B, 4 * H}, d_r_shape{T, B, H}, row{B, H};
  scratch.reserve(d_p_shape);
  if (multiplicative) scratch.reserve(d_q_shape);
  scratch.reserve(d_r_shape);
  for (int n = 0; n < 4; ++n) scratch.reserve(row);  // d_m, d_r W_hh, d_c, zeros for an absent d_hT
  Tensor d_p = scratch.take(d_p_shape);
  Tensor d_q = multiplicative ? scratch.take(d_q_shape) : d_p.narrow(2, H, 4 * H);
  Tensor d_r = scratch.take(d_r_shape);
  Tensor d_m = scratch.take(row), d_h_product = scratch.take(row), d_c = scratch.take(row);
  Tensor d_hT_or_zero = scratch.take(row);
  start_from(d_hT, d_hT_or_zero);
  start_from(d_cT, d_c);
  std::optional<Tensor> d_hs = contiguous(d_hs_given);
  Tensor w_hh_c = w_hh.contiguous(), w_mh_c = w_mh.contiguous();
  const int64_t p_stride = p.stride(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlstm_layer_backward", [&] {
    const scalar_t* w_hh_p = w_hh_c.data_ptr<scalar_t>();  // the vector, under independent recurrence
    std::optional<StepWeight<scalar_t>> w_hh_step;
    if (!independent) w_hh_step.emplace(w_hh_c, B);
    const StepWeight<scalar_t> w_mh_step(w_mh_c, B);
    const scalar_t* p_base = p.data_ptr<scalar_t>();
    scalar_t* d_p_base = d_p.data_ptr<scalar_t>();
    scalar_t* d_q_base = multiplicative ? d_q.data_ptr<scalar_t>() : nullptr;
    scalar_t* d_r_base = d_r.data_ptr<scalar_t>();
    const scalar_t* d_hs_base = ptr_or_null<scalar_t>(d_hs);
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t step = t * B * H;
      const scalar_t* extra = d_hT_or_zero.data_ptr<scalar_t>();
      const scalar_t* w_hh_vector = nullptr;
      if (t < T - 1) {
        const scalar_t* d_r_next = d_r_base + step + B * H;
        if (independent) {
          extra = d_r_next;
          w_hh_vector = w_hh_p;
        } else {
          w_hh_step->multiply(d_r_next, H, false, d_h_product.data_ptr<scalar_t>(), H);
          extra = d_h_product.data_ptr<scalar_t>();
        }
      }
      const scalar_t* p_t = p_base + t * p.stride(0);
      scalar_t* d_p_t = d_p_base + t * B * 5 * H;
      scalar_t* d_q_t = multiplicative ? d_q_base + t * B * 4 * H : d_p_t + H;
      over_rows(B, H, [&](int64_t b0, int64_t b1) {
        backward_rows<scalar_t>(b0, b1, H, d_hs_base ? d_hs_base + step : nullptr, extra, w_hh_vector,
                                d_c.data_ptr<scalar_t>(), t < T - 1 ? f.data_ptr<scalar_t>() + step + B * H : nullptr,
                                dh_to_dc.data_ptr<scalar_t>() + step, K.data_ptr<scalar_t>() + 4 * step, d_p_t + H,
                                5 * H, multiplicative ? p_t + H : nullptr, p_stride,
                                multiplicative ? q_all.data_ptr<scalar_t>() + 4 * step : nullptr,
                                multiplicative ? d_q_t : nullptr);
      });
      w_mh_step.multiply(d_q_t, multiplicative ? 4 * H : 5 * H, false, d_m.data_ptr<scalar_t>(), H);
      over_rows(B, H, [&](int64_t b0, int64_t b1) {
        mix_backward_rows<scalar_t>(b0, b1, H, d_m.data_ptr<scalar_t>(), p_t, p_stride,
                                    r_all.data_ptr<scalar_t>() + step, d_r_base + step, d_p_t, 5 * H);
      });
    }
  });
  const LayerGradients g = layer_gradients(x, h0, hs, w_ih, w_hh, d_p, d_q, d_r, m_all, has_b_ih, has_b_hh, has_b_mh,
                                           need_dx);
  Tensor d_c0 = d_c * f[0];
  return {g.d_x, g.d_h0, d_c0, g.d_w_ih, g.d_w_hh, g.d_w_mh, g.d_b_ih, g.d_b_hh, g.d_b_mh};
}

// ---- the layer with the spec's variants (backends/torch/variants.py) --------------------------------------
// A projection h = W_hr k of k = o tanh(c), clipped to +-proj_clip; peepholes (w_ci and w_cf read c_{t-1},
// w_co reads c_t); c_t clipped to +-cell_clip; forget_bias added to f's pre-activation. The computation
// of forward_loop and backward_loop in variants.py, on its VariantTape.

// What the variant forward and backward both set up once per call: the peephole vectors (null where
// absent), the clip bounds (0 where off), and the per-step products' weights, W_hh (unless independent),
// W_hr (with a projection) and W_mh, as (k x n) operands for products of B rows.
template <typename scalar_t>
struct VariantStep {
  const scalar_t *w_ci, *w_cf, *w_co;
  scalar_t c_bound, h_bound;
  std::optional<StepWeight<scalar_t>> w_hh, w_hr;
  StepWeight<scalar_t> w_mh;
  VariantStep(const std::optional<Tensor>& w_ci_, const std::optional<Tensor>& w_cf_,
              const std::optional<Tensor>& w_co_, std::optional<double> cell_clip, std::optional<double> proj_clip,
              const std::optional<Tensor>& w_hh_, const std::optional<Tensor>& w_hr_, const Tensor& w_mh_, int64_t B)
      : w_ci(ptr_or_null<scalar_t>(w_ci_)), w_cf(ptr_or_null<scalar_t>(w_cf_)), w_co(ptr_or_null<scalar_t>(w_co_)),
        c_bound(cell_clip ? static_cast<scalar_t>(*cell_clip) : scalar_t(0)),
        h_bound(proj_clip ? static_cast<scalar_t>(*proj_clip) : scalar_t(0)), w_mh(w_mh_, B) {
    if (w_hh_) w_hh.emplace(*w_hh_, B);
    if (w_hr_) w_hr.emplace(*w_hr_, B);
  }
};

// One step's gates and cell, rows [b0, b1): a = pre pg (multiplicative) or pre + pg, the blocks (i, o, f, z);
// i and f also see c_prev (peepholes, w_ci null: none) and f forget_bias; c = f c_prev + i z, written
// unclipped to c_unclipped (when given) and clipped to +-clip (when clip_c) into c; o sees that c through
// w_co; k = o tanh(c). gates (B, 4H) receives i, o, f, z and tanh_c (B, H) tanh(c).
template <typename scalar_t>
void variant_gate_rows(int64_t b0, int64_t b1, int64_t H, const scalar_t* pre, const scalar_t* pg,
                       int64_t pg_stride, bool multiplicative, const scalar_t* w_ci, const scalar_t* w_cf,
                       const scalar_t* w_co, bool clip_c, scalar_t clip, scalar_t forget_bias, const scalar_t* c_prev,
                       scalar_t* c, scalar_t* c_unclipped, scalar_t* gates, scalar_t* tanh_c, scalar_t* k) {
  using V = Vectorized<scalar_t>;
  auto pre_activation = [&](int64_t b, int64_t block, int64_t j, int count) {
    const V a = V::loadu(pre + b * 4 * H + block * H + j, count);
    const V g = V::loadu(pg + b * pg_stride + block * H + j, count);
    return multiplicative ? a * g : a + g;
  };
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    pre_activation(b, 3, j, count).store(gates + b * 4 * H + 3 * H + j, count);
  });
  for (int64_t b = b0; b < b1; ++b) tanh_inplace(gates + b * 4 * H + 3 * H, H);
  const V low(-clip), high(clip), bias(forget_bias);
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * H + j;
    scalar_t* g = gates + b * 4 * H;
    const V cp = V::loadu(c_prev + at, count);
    V a_i = pre_activation(b, 0, j, count), a_f = pre_activation(b, 2, j, count);
    if (w_ci) {
      a_i = a_i + V::loadu(w_ci + j, count) * cp;
      a_f = a_f + V::loadu(w_cf + j, count) * cp;
    }
    if (forget_bias != scalar_t(0)) a_f = a_f + bias;
    const V i = sigmoid(a_i), f = sigmoid(a_f);
    V c_new = f * cp + i * V::loadu(g + 3 * H + j, count);
    if (c_unclipped) c_new.store(c_unclipped + at, count);
    if (clip_c) c_new = at::vec::minimum(at::vec::maximum(c_new, low), high);
    c_new.store(c + at, count);
    c_new.store(tanh_c + at, count);
    V a_o = pre_activation(b, 1, j, count);
    if (w_co) a_o = a_o + V::loadu(w_co + j, count) * c_new;
    i.store(g + j, count);
    sigmoid(a_o).store(g + H + j, count);
    f.store(g + 2 * H + j, count);
  });
  tanh_inplace(tanh_c + b0 * H, (b1 - b0) * H);
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * H + j;
    (V::loadu(gates + b * 4 * H + H + j, count) * V::loadu(tanh_c + at, count)).store(k + at, count);
  });
}

// out = value clipped to +-clip, rows [b0, b1) of width P
template <typename scalar_t>
void clip_rows(int64_t b0, int64_t b1, int64_t P, const scalar_t* value, scalar_t clip, scalar_t* out) {
  using V = Vectorized<scalar_t>;
  const V low(-clip), high(clip);
  each_vector<scalar_t>(b0, b1, P, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * P + j;
    at::vec::minimum(at::vec::maximum(V::loadu(value + at, count), low), high).store(out + at, count);
  });
}

// The gradient of a projected output, rows [b0, b1) of width P: d_k = (extra + d_hs), kept where
// |h_unclipped| <= clip (both ends included, as the spec's clip_gradient) and zero elsewhere
// (h_unclipped null: no proj_clip). d_k is the gradient of W_hr k.
template <typename scalar_t>
void projected_backward_rows(int64_t b0, int64_t b1, int64_t P, const scalar_t* d_hs, const scalar_t* extra,
                             const scalar_t* h_unclipped, scalar_t clip, scalar_t* d_k) {
  using V = Vectorized<scalar_t>;
  const V bound(clip);
  each_vector<scalar_t>(b0, b1, P, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * P + j;
    V dh = V::loadu(extra + at, count);
    if (d_hs) dh = dh + V::loadu(d_hs + at, count);
    if (h_unclipped) dh = dh * V::loadu(h_unclipped + at, count).abs().le(bound);
    dh.store(d_k + at, count);
  });
}

// One step's gradient through the gates and cell, rows [b0, b1) of width H. d_h = extra (times w_hh_vector
// when given) + d_hs (when given), the gradient of k = o tanh(c) under a projection; d_c holds the
// gradient carried from step t + 1 (d_c_T at the last step) and receives the one carried to step t - 1:
//   d_a_o = d_h tanh(c) o(1-o);  d_c += d_h o (1 - tanh(c)^2) + d_a_o w_co, zeroed where |c_unclipped| > clip;
//   d_a_i = d_c z i(1-i), d_a_f = d_c c_prev f(1-f), d_a_z = d_c i(1-z^2);
//   carried: d_c f + d_a_i w_ci + d_a_f w_cf.
// d_a goes to d_p_gates (rows of stride d_p_stride) under addition; under multiplicative integration
// (q given) d_p_gates = d_a q, d_q = d_a pg, and d_a itself to d_a_out when given.
template <typename scalar_t>
void variant_backward_rows(int64_t b0, int64_t b1, int64_t H, const scalar_t* d_hs, const scalar_t* extra,
                           const scalar_t* w_hh_vector, const scalar_t* gates, const scalar_t* tanh_c,
                           const scalar_t* c_prev, const scalar_t* c_unclipped, scalar_t clip, const scalar_t* w_ci,
                           const scalar_t* w_cf, const scalar_t* w_co, scalar_t* d_c, const scalar_t* pg,
                           int64_t pg_stride, const scalar_t* q, scalar_t* d_p_gates, int64_t d_p_stride,
                           scalar_t* d_q, scalar_t* d_a_out) {
  using V = Vectorized<scalar_t>;
  const V one(scalar_t(1)), bound(clip);
  each_vector<scalar_t>(b0, b1, H, [&](int64_t b, int64_t j, int count) {
    const int64_t at = b * H + j;
    const scalar_t* g = gates + b * 4 * H;
    V dh = V::loadu(extra + at, count);
    if (w_hh_vector) dh = dh * V::loadu(w_hh_vector + j, count);
    if (d_hs) dh = dh + V::loadu(d_hs + at, count);
    const V i = V::loadu(g + j, count), o = V::loadu(g + H + j, count), f = V::loadu(g + 2 * H + j, count);
    const V z = V::loadu(g + 3 * H + j, count), t = V::loadu(tanh_c + at, count);
    V dc = V::loadu(d_c + at, count) + dh * o * (one - t * t);
    const V d_a_o = dh * t * (o * (one - o));
    if (w_co) dc = dc + d_a_o * V::loadu(w_co + j, count);
    if (c_unclipped) dc = dc * V::loadu(c_unclipped + at, count).abs().le(bound);
    const V d_a_i = dc * (z * i * (one - i));
    const V d_a_f = dc * (V::loadu(c_prev + at, count) * f * (one - f));
    const V d_a_z = dc * (i * (one - z * z));
    V carried = dc * f;
    if (w_ci) carried = carried + d_a_i * V::loadu(w_ci + j, count) + d_a_f * V::loadu(w_cf + j, count);
    carried.store(d_c + at, count);
    const V d_a[4] = {d_a_i, d_a_o, d_a_f, d_a_z};
    for (int64_t block = 0; block < 4; ++block) {
      const int64_t col = block * H + j, row_col = b * 4 * H + col;
      if (q) {
        (d_a[block] * V::loadu(q + row_col, count)).store(d_p_gates + b * d_p_stride + col, count);
        (d_a[block] * V::loadu(pg + b * pg_stride + col, count)).store(d_q + row_col, count);
        if (d_a_out) d_a[block].store(d_a_out + row_col, count);
      } else {
        d_a[block].store(d_p_gates + b * d_p_stride + col, count);
      }
    }
  });
}

// The fields of VariantTape (variants.py), in its order.
enum VariantField { kP, kR, kM, kQ, kGates, kCs, kCUnclipped, kTanhC, kK, kHUnclipped, kVariantFields };

// forward_loop of variants.py: (hs, h_T, c_T, the ten fields of VariantTape). With keep_tape false every
// field is empty: each step's intermediates then live in scratch rows, and the input projection is
// computed chunk_bytes at a time.
std::vector<Tensor> variant_layer_forward(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& w_mh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh_given, const std::optional<Tensor>& b_mh_given,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& w_ci_given, const std::optional<Tensor>& w_cf_given,
    const std::optional<Tensor>& w_co_given, bool multiplicative, std::optional<double> cell_clip,
    std::optional<double> proj_clip, double forget_bias, bool keep_tape, int64_t chunk_bytes) {
  const std::optional<Tensor> b_hh = contiguous(b_hh_given), b_mh = contiguous(b_mh_given);
  const std::optional<Tensor> w_ci = contiguous(w_ci_given), w_cf = contiguous(w_cf_given),
                              w_co = contiguous(w_co_given);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = c0.size(-1), P = h0.size(-1);
  const bool projection = w_hr.has_value(), clip_c = cell_clip.has_value(), clip_h = proj_clip.has_value();
  const int64_t chunk = keep_tape ? T
      : std::max<int64_t>(1, std::min<int64_t>(T, chunk_bytes / (B * 5 * H * x.element_size())));
  // Each field's width, whether this layer computes it (q always: it is the input of the gates) and
  // whether the tape keeps it; what it does not keep lives in scratch: one step (the cell state: the
  // previous and the current; the input projection: one chunk of steps).
  const int64_t width[kVariantFields] = {5 * H, H, H, 4 * H, 4 * H, H, H, H, H, P};
  const bool computed[kVariantFields] = {true, true, true, true, true, true, clip_c, true, projection, clip_h};
  const bool kept_field[kVariantFields] = {true, true, true, multiplicative, true, true, clip_c, true, projection,
                                           clip_h};
  auto kept = [&](int n) { return keep_tape && kept_field[n]; };
  auto scratch_steps = [&](int n) -> int64_t { return n == kP ? chunk : n == kCs ? 2 : 1; };
  Scratch scratch(x.options());
  for (int n = 0; n < kVariantFields; ++n)
    if (computed[n] && !kept(n)) scratch.reserve({scratch_steps(n), B, width[n]});
  std::vector<Tensor> field(kVariantFields);
  for (int n = 0; n < kVariantFields; ++n)
    field[n] = !computed[n] ? empty0(x)
        : kept(n) ? KeptBlocks::empty({n == kCs ? T + 1 : T, B, width[n]}, x.options())
        : scratch.take({scratch_steps(n), B, width[n]});
  Tensor hs = at::empty({T, B, P}, x.options());
  field[kCs][0].copy_(c0);
  const bool independent = w_hh.dim() == 1;
  Tensor w_hh_t = independent ? w_hh.contiguous() : w_hh.t().contiguous();  // (P, H): h W_hh^T
  Tensor w_mh_t = w_mh.t().contiguous();
  Tensor w_hr_t = projection ? w_hr->t().contiguous() : Tensor();
  Tensor w_ih_t = w_ih.t();
  Tensor h0c = h0.contiguous();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlstm_variant_layer_forward", [&] {
    // step n's rows of field f: a field holding fewer steps than T is a ring of them
    auto rows_of = [&](int f, int64_t n) {
      return field[f].data_ptr<scalar_t>() + (n % field[f].size(0)) * B * width[f];
    };
    const scalar_t* b_hh_p = ptr_or_null<scalar_t>(b_hh);
    const scalar_t* b_mh_p = ptr_or_null<scalar_t>(b_mh);
    const VariantStep<scalar_t> v(
        w_ci, w_cf, w_co, cell_clip, proj_clip, independent ? std::nullopt : std::optional<Tensor>(w_hh_t),
        projection ? std::optional<Tensor>(w_hr_t) : std::nullopt, w_mh_t, B);
    const scalar_t* h_prev = h0c.data_ptr<scalar_t>();
    const bool projection_on_onednn = sequence_product_on_onednn(w_ih);
    for (int64_t t = 0; t < T; ++t) {
      if (t % chunk == 0) {
        const int64_t n = std::min(chunk, T - t);
        Tensor x_rows = x.narrow(0, t, n).reshape({n * B, I});
        Tensor p_rows = field[kP].narrow(0, 0, n).view({n * B, 5 * H});
        if (projection_on_onednn) p_rows.copy_(onednn_linear(x_rows, w_ih, b_ih));
        else if (b_ih) at::addmm_out(p_rows, *b_ih, x_rows, w_ih_t);
        else at::mm_out(p_rows, x_rows, w_ih_t);
      }
      scalar_t* p_t = rows_of(kP, t);
      scalar_t* r = rows_of(kR, t);
      scalar_t* m = rows_of(kM, t);
      scalar_t* q = rows_of(kQ, t);
      scalar_t* h = hs.data_ptr<scalar_t>() + t * B * P;
      if (!independent) v.w_hh->multiply(h_prev, P, false, r, H);
      over_rows(B, H, [&](int64_t b0, int64_t b1) {
        mix_rows<scalar_t>(b0, b1, H, r, h_prev, independent ? w_hh_t.data_ptr<scalar_t>() : nullptr, b_hh_p, p_t,
                           5 * H, nullptr, nullptr, 0, m);
      });
      if (b_mh_p)
        for (int64_t b = 0; b < B; ++b) std::copy(b_mh_p, b_mh_p + 4 * H, q + b * 4 * H);
      v.w_mh.multiply(m, H, b_mh_p != nullptr, q, 4 * H);
      scalar_t* k = projection ? rows_of(kK, t) : h;
      over_rows(B, H, [&](int64_t b0, int64_t b1) {
        variant_gate_rows<scalar_t>(b0, b1, H, q, p_t + H, 5 * H, multiplicative, v.w_ci, v.w_cf, v.w_co, clip_c,
                                    v.c_bound, static_cast<scalar_t>(forget_bias), rows_of(kCs, t),
                                    rows_of(kCs, t + 1), clip_c ? rows_of(kCUnclipped, t) : nullptr,
                                    rows_of(kGates, t), rows_of(kTanhC, t), k);
      });
      if (projection && clip_h) {
        scalar_t* h_unclipped = rows_of(kHUnclipped, t);
        v.w_hr->multiply(k, H, false, h_unclipped, P);
        over_rows(B, P, [&](int64_t b0, int64_t b1) { clip_rows<scalar_t>(b0, b1, P, h_unclipped, v.h_bound, h); });
      } else if (projection) {
        v.w_hr->multiply(k, H, false, h, P);
      }
      h_prev = h;
    }
  });
  Tensor h_T = hs[T - 1].clone(), c_T = field[kCs][T % field[kCs].size(0)].clone();
  std::vector<Tensor> out{hs, h_T, c_T};
  for (int n = 0; n < kVariantFields; ++n) out.push_back(kept(n) ? field[n] : empty0(x));
  return out;
}

// backward_loop of variants.py: the gradients of (x, h0, c0, w_ih, w_hh, w_mh, b_ih, b_hh, b_mh, w_hr,
// w_ci, w_cf, w_co), an empty tensor for one not asked for or absent.
std::vector<Tensor> variant_layer_backward(
    const std::optional<Tensor>& d_hs_given, const std::optional<Tensor>& d_hT, const std::optional<Tensor>& d_cT,
    const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& w_mh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& w_ci_given, const std::optional<Tensor>& w_cf_given,
    const std::optional<Tensor>& w_co_given, bool has_b_ih, bool has_b_hh, bool has_b_mh, bool multiplicative,
    std::optional<double> cell_clip, std::optional<double> proj_clip, bool need_dx, const Tensor& hs,
    const std::vector<Tensor>& tape_given) {
  TORCH_CHECK(tape_given.size() == kVariantFields, "variant_layer_backward: the tape has ", kVariantFields,
              " fields, got ", tape_given.size());
  std::vector<Tensor> tape;
  for (const Tensor& f : tape_given) tape.push_back(f.contiguous());
  const std::optional<Tensor> w_ci = contiguous(w_ci_given), w_cf = contiguous(w_cf_given),
                              w_co = contiguous(w_co_given);
  const int64_t T = x.size(0), B = x.size(1), H = tape[kCs].size(-1), P = h0.size(-1);
  const int64_t rows = T * B;
  const bool independent = w_hh.dim() == 1, projection = w_hr.has_value(), peepholes = w_ci.has_value();
  Scratch scratch(x.options());
  const std::vector<int64_t> d_p_shape{T, B, 5 * H}, gates_shape{T, B, 4 * H}, d_r_shape{T, B, H},
      d_k_shape{T, B, P}, row{B, H}, output_row{B, P};
  scratch.reserve(d_p_shape);
  if (multiplicative) scratch.reserve(gates_shape);  // d_q
  if (multiplicative && peepholes) scratch.reserve(gates_shape);  // d_a
  scratch.reserve(d_r_shape);
  if (projection) scratch.reserve(d_k_shape);
  scratch.reserve(row);  // d_m
  scratch.reserve(row);  // d_c
  scratch.reserve(row);  // d_h W_hr (projection)
  scratch.reserve(output_row);  // d_r W_hh
  scratch.reserve(output_row);  // d_hT or zeros
  Tensor d_p = scratch.take(d_p_shape);
  Tensor d_q = multiplicative ? scratch.take(gates_shape) : d_p.narrow(2, H, 4 * H);
  Tensor d_a = !multiplicative ? d_p.narrow(2, H, 4 * H) : peepholes ? scratch.take(gates_shape) : Tensor();
  Tensor d_r = scratch.take(d_r_shape);
  Tensor d_k = projection ? scratch.take(d_k_shape) : Tensor();
  Tensor d_m = scratch.take(row), d_c = scratch.take(row), d_projected = scratch.take(row);
  Tensor d_h_product = scratch.take(output_row), d_hT_or_zero = scratch.take(output_row);
  start_from(d_hT, d_hT_or_zero);
  start_from(d_cT, d_c);
  std::optional<Tensor> d_hs = contiguous(d_hs_given);
  Tensor w_hh_c = w_hh.contiguous(), w_mh_c = w_mh.contiguous();
  Tensor w_hr_c = projection ? w_hr->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlstm_variant_layer_backward", [&] {
    auto step_of = [&](const Tensor& f, int64_t t) { return f.data_ptr<scalar_t>() + t * f.stride(0); };
    const VariantStep<scalar_t> v(
        w_ci, w_cf, w_co, cell_clip, proj_clip, independent ? std::nullopt : std::optional<Tensor>(w_hh_c),
        projection ? std::optional<Tensor>(w_hr_c) : std::nullopt, w_mh_c, B);
    const scalar_t* d_hs_base = ptr_or_null<scalar_t>(d_hs);
    for (int64_t t = T - 1; t >= 0; --t) {
      const scalar_t* extra = d_hT_or_zero.data_ptr<scalar_t>();
      const scalar_t* w_hh_vector = nullptr;
      if (t < T - 1) {
        const scalar_t* d_r_next = step_of(d_r, t + 1);
        if (independent) {
          extra = d_r_next;
          w_hh_vector = w_hh_c.data_ptr<scalar_t>();
        } else {
          v.w_hh->multiply(d_r_next, H, false, d_h_product.data_ptr<scalar_t>(), P);
          extra = d_h_product.data_ptr<scalar_t>();
        }
      }
      const scalar_t* d_hs_t = d_hs_base ? d_hs_base + t * B * P : nullptr;
      if (projection) {
        scalar_t* d_k_t = step_of(d_k, t);
        const scalar_t* h_unclipped = proj_clip ? step_of(tape[kHUnclipped], t) : nullptr;
        over_rows(B, P, [&](int64_t b0, int64_t b1) {
          projected_backward_rows<scalar_t>(b0, b1, P, d_hs_t, extra, h_unclipped, v.h_bound, d_k_t);
        });
        v.w_hr->multiply(d_k_t, P, false, d_projected.data_ptr<scalar_t>(), H);
        extra = d_projected.data_ptr<scalar_t>();
        d_hs_t = nullptr;
      }
      const scalar_t* p_t = step_of(tape[kP], t);
      scalar_t* d_p_t = step_of(d_p, t);
      scalar_t* d_q_t = multiplicative ? step_of(d_q, t) : d_p_t + H;
      over_rows(B, H, [&](int64_t b0, int64_t b1) {
        variant_backward_rows<scalar_t>(
            b0, b1, H, d_hs_t, extra, w_hh_vector, step_of(tape[kGates], t), step_of(tape[kTanhC], t),
            step_of(tape[kCs], t), cell_clip ? step_of(tape[kCUnclipped], t) : nullptr, v.c_bound, v.w_ci, v.w_cf,
            v.w_co, d_c.data_ptr<scalar_t>(), p_t + H, 5 * H, multiplicative ? step_of(tape[kQ], t) : nullptr,
            d_p_t + H, 5 * H, multiplicative ? d_q_t : nullptr,
            multiplicative && peepholes ? step_of(d_a, t) : nullptr);
      });
      v.w_mh.multiply(d_q_t, multiplicative ? 4 * H : 5 * H, false, d_m.data_ptr<scalar_t>(), H);
      over_rows(B, H, [&](int64_t b0, int64_t b1) {
        mix_backward_rows<scalar_t>(b0, b1, H, d_m.data_ptr<scalar_t>(), p_t, 5 * H, step_of(tape[kR], t),
                                    step_of(d_r, t), d_p_t, 5 * H);
      });
    }
  });
  const LayerGradients g = layer_gradients(x, h0, hs, w_ih, w_hh, d_p, d_q, d_r, tape[kM], has_b_ih, has_b_hh,
                                           has_b_mh, need_dx);
  Tensor d_c0 = d_c.clone();
  Tensor d_w_hr = projection ? weight_gradient(d_k.view({rows, P}), tape[kK].view({rows, H})) : empty0(x);
  Tensor d_w_ci = empty0(x), d_w_cf = empty0(x), d_w_co = empty0(x);
  if (peepholes) {
    Tensor cs = tape[kCs];
    d_w_ci = (d_a.narrow(2, 0, H) * cs.narrow(0, 0, T)).sum({0, 1});
    d_w_co = (d_a.narrow(2, H, H) * cs.narrow(0, 1, T)).sum({0, 1});
    d_w_cf = (d_a.narrow(2, 2 * H, H) * cs.narrow(0, 0, T)).sum({0, 1});
  }
  return {g.d_x, g.d_h0, d_c0, g.d_w_ih, g.d_w_hh, g.d_w_mh, g.d_b_ih, g.d_b_hh, g.d_b_mh, d_w_hr, d_w_ci, d_w_cf,
          d_w_co};
}

}  // namespace

// The returned lists are (hs, h_T, c_T, *tape) and the nine gradients (d_x, d_h0, d_c0, d_w_ih, d_w_hh,
// d_w_mh, d_b_ih, d_b_hh, d_b_mh); the tape's fields are in the order of Tape in backends/torch/fused.py.
// The variant functions': (hs, h_T, c_T, *VariantTape) and those nine plus d_w_hr, d_w_ci, d_w_cf, d_w_co.
void define_cell_step(pybind11::module& m);  // cpu_step.cpp: one step without autograd

// The distinct threads at::parallel_for runs `count` one-item pieces on: 1 where the extension is
// compiled without OpenMP, whatever torch's thread count (the tests check which build this is).
int64_t parallel_for_threads(int64_t count) {
  std::mutex mutex;
  std::set<int> seen;
  at::parallel_for(0, count, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(mutex);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_forward", &layer_forward, "the fused forward loop");
  m.def("layer_backward", &layer_backward, "the fused backward loop");
  m.def("variant_layer_forward", &variant_layer_forward, "the fused forward loop with the spec's variants");
  m.def("variant_layer_backward", &variant_layer_backward, "the fused backward loop with the spec's variants");
  define_cell_step(m);
  m.def(
      "last_sliced_forward",
      [] {
        std::lock_guard<std::mutex> guard(last_sliced_mutex);
        std::vector<std::tuple<int64_t, int64_t, double>> out;
        for (const SliceRecord& slice : last_sliced) out.emplace_back(slice.rows, slice.projections_by_others, slice.finished);
        return out;
      },
      "the last sliced forward of this process, per slice: (rows, how many of its chunks' projections other "
      "slices' threads computed, seconds from the call's start to the end of its own steps)");
  m.def("kept_free_bytes", &KeptBlocks::free_bytes,
        "bytes held in free blocks for a training call's large arrays (MLSTM_TORCH_KEPT_MEGABYTES)");
  m.def("forward_help", &forward_help, "whether a sliced forward's threads compute projections for one another");
  m.def("forward_slices", &forward_slices,
        "the slices of the batch a forward of this many rows runs on (1: the step-parallel loop), given "
        "whether its tape keeps every step's projection (multiplicative integration)");
  m.def("parallel_for_threads", &parallel_for_threads,
        "the distinct threads at::parallel_for runs this many one-item pieces on");
  m.def("onednn_products", [] { return onednn() != nullptr; },
        "whether products can run on oneDNN here (torch's mkldnn::_linear_pointwise operator)");
  m.def("sequence_gemm_choices", &sequence_gemm_choices,
        "the whole-sequence products' choices so far: (n, k, threads, 'onednn' or 'mkl')");
  m.def("gradient_gemm_choices", &gradient_gemm_choices,
        "the weight gradients' choices so far: (n, k, threads, 'onednn' or 'mkl')");
  m.def("step_gemm_choices", &step_gemm_choices,
        "the per-step products' choices so far: (rows, n, k, threads, 'packed', 'plain' or 'onednn')");
}
