// adaLN for DiT blocks (Peebles & Xie 2023), row-wise over x = [B, N, D] seen as rows = B * N rows of D:
//
//   adaln_modulate:        out[r] = LayerNorm(x[r]) * (1 + scale[b]) + shift[b]   (no affine, biased variance)
//   adaln_gated_residual:  out[r] = residual[r] + gate[b] * y[r]
//
// with b = r / tokens. x, residual, y and out are contiguous; shift / scale / gate are [B, D] rows `param_stride`
// elements apart with unit stride inside a row (e.g. chunks of a [B, 6D] modulation vector, read in place). One
// dtype for all, named by `dtype` ("float32", "float64"; the CUDA kernels also take "float16" and "bfloat16").
// Pointers are integers (Tensor.data_ptr()): the module never links to torch. `out` must not overlap an input.
// Statistics: float64 on the CPU, float32 on the GPU (float64 for float64), two-pass (mean, then the centered
// sum of squares). Half types compute in float32 and round once. Bad arguments throw std::invalid_argument
// (ValueError in Python), CUDA failures std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

namespace blitzdiff {

void adaln_modulate_cpu(std::uintptr_t out, std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                        std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride,
                        double eps, const std::string& dtype, std::int64_t threads);

void adaln_gated_residual_cpu(std::uintptr_t out, std::uintptr_t residual, std::uintptr_t y, std::uintptr_t gate,
                              std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride,
                              const std::string& dtype, std::int64_t threads);

#ifdef BLITZDIFF_WITH_CUDA
// Enqueue on `stream` (a cudaStream_t as an integer) of the current device; no synchronization (graph-capturable).
void adaln_modulate_cuda(std::uintptr_t out, std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                         std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride,
                         double eps, const std::string& dtype, std::uintptr_t stream);

void adaln_gated_residual_cuda(std::uintptr_t out, std::uintptr_t residual, std::uintptr_t y, std::uintptr_t gate,
                               std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride,
                               const std::string& dtype, std::uintptr_t stream);
#endif

// Throws std::invalid_argument unless rows >= 0, tokens >= 1, dim >= 1, param_stride >= 0 (0: one row broadcast
// to the batch) and, for rows > 0, every pointer is non-null.
void check_adaln_args(const char* op, std::uintptr_t out, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c,
                      std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride);

}  // namespace blitzdiff
