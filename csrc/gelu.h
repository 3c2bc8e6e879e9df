// The tanh-approximate GELU (Hendrycks & Gimpel 2016) of DiT's MLP, elementwise over n contiguous elements:
//
//   gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x / (1 + exp(-2z)),   z = sqrt(2 / pi) (x + 0.044715 x^3)
//
// computed in the second form (no cancellation in 1 + tanh(z) for negative x). Where exp(-2z) overflows to inf the
// result is x * 0 (-0 for finite x, NaN for -inf, as torch's F.gelu(approximate="tanh") gives). float32 on the CPU
// uses a vectorizable exp (vectorize.h, about 1 ulp); float64 calls std::exp. Half types (CUDA only) compute in
// float32 and round once. `out` may be `x` (in place). Pointers are integers (Tensor.data_ptr()): the module never
// links to torch. Bad arguments throw std::invalid_argument (ValueError in Python), CUDA failures std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

namespace blitzdiff {

// On up to `threads` threads (parallel.h); each element is computed the same way on any thread.
void gelu_tanh_cpu(std::uintptr_t out, std::uintptr_t x, std::int64_t n, const std::string& dtype,
                   std::int64_t threads);

#ifdef BLITZDIFF_WITH_CUDA
// Enqueue on `stream` (a cudaStream_t as an integer) of the current device; no synchronization (graph-capturable).
void gelu_tanh_cuda(std::uintptr_t out, std::uintptr_t x, std::int64_t n, const std::string& dtype,
                    std::uintptr_t stream);
#endif

// Throws std::invalid_argument unless n >= 0 and, for n > 0, both pointers are non-null.
void check_gelu_args(std::uintptr_t out, std::uintptr_t x, std::int64_t n);

}  // namespace blitzdiff
