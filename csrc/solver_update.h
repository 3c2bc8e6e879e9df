// Fused solver update (ARCHITECTURE.md contract 2): out = a*x + b*d0 [+ c*d1] [+ s*noise].
//
// All buffers are contiguous with n elements of the one dtype named by `dtype` ("float32", "float64"; the CUDA
// kernel also takes "float16" and "bfloat16"). Pointers arrive as integers (torch's Tensor.data_ptr()) so the
// module never links to torch. d1 == 0 or noise == 0 drops that term. `out` must not overlap any input;
// inputs may alias each other. Half types accumulate in float32, float32 in float32, float64 in float64.
// Bad arguments throw std::invalid_argument (ValueError in Python), CUDA failures std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

namespace blitzdiff {

void solver_update_cpu(std::uintptr_t out, std::uintptr_t x, std::uintptr_t d0, std::uintptr_t d1,
                       std::uintptr_t noise, std::int64_t n, const std::string& dtype, double a, double b, double c,
                       double s);

#ifdef BLITZDIFF_WITH_CUDA
// Enqueues the kernel on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream) of the device
// whose context is current; does not synchronize, so it is safe inside CUDA graph capture.
void solver_update_cuda(std::uintptr_t out, std::uintptr_t x, std::uintptr_t d0, std::uintptr_t d1,
                        std::uintptr_t noise, std::int64_t n, const std::string& dtype, double a, double b, double c,
                        double s, std::uintptr_t stream);
#endif

// Throws std::invalid_argument unless n >= 0 and, for n > 0, the required pointers (out, x, d0) are non-null.
void check_solver_update_args(std::uintptr_t out, std::uintptr_t x, std::uintptr_t d0, std::int64_t n);

}  // namespace blitzdiff
