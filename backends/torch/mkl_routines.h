// The MKL routines the C++ loops (cpu_loops.cpp) and the one-step kernel (cpu_step.cpp) call directly.
// x86 builds of torch carry MKL and export these symbols; torch's own CPU BLAS calls the Fortran ones
// with 32-bit integers. Declared here rather than taken from mkl.h, which torch's wheels do not ship.
// backends/torch/build.py hashes this file with the sources, so a change here rebuilds the extension.
#pragma once

#include <ATen/Config.h>

#include <cstddef>

#if AT_MKL_ENABLED()
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
void sgemv_(const char* trans, const int* m, const int* n, const float* alpha, const float* a, const int* lda,
            const float* x, const int* incx, const float* beta, float* y, const int* incy);
void dgemv_(const char* trans, const int* m, const int* n, const double* alpha, const double* a, const int* lda,
            const double* x, const int* incx, const double* beta, double* y, const int* incy);
// MKL's vector tanh, the one torch.tanh uses on contiguous CPU tensors: about 4x faster here than
// SLEEF's, which ATen's Vectorized::tanh calls. Integers go as 64 bits: right for LP64 and ILP64.
void vsTanh(long long n, const float* a, float* r);
void vdTanh(long long n, const double* a, double* r);
// MKL's packed products: a weight packed once per call serves every step's product (float only).
size_t cblas_sgemm_pack_get_size(int identifier, long long m, long long n, long long k);
void cblas_sgemm_pack(int layout, int identifier, int trans, long long m, long long n, long long k, float alpha,
                      const float* src, long long ld, float* dest);
void cblas_sgemm_compute(int layout, long long transa, long long transb, long long m, long long n, long long k,
                         const float* a, long long lda, const float* b, long long ldb, float beta, float* c,
                         long long ldc);
// Out-of-place transpose (B = A^T for ordering 'R', trans 'T'): ~3x faster here than a strided copy.
void MKL_Somatcopy(char ordering, char trans, size_t rows, size_t cols, float alpha, const float* a, size_t lda,
                   float* b, size_t ldb);
void MKL_Domatcopy(char ordering, char trans, size_t rows, size_t cols, double alpha, const double* a, size_t lda,
                   double* b, size_t ldb);
int mkl_get_max_threads();  // the threads an MKL call from this thread would use
// The Fortran-convention entry (by reference), the one libtorch_cpu exports under both names; returns the
// thread's previous setting (0: none of its own).
int mkl_set_num_threads_local_(const int* threads);
}
// CBLAS constants (mkl_cblas.h)
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
#endif
