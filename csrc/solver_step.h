// Fused solver step (ARCHITECTURE.md contracts 1-2): classifier-free guidance, the denoiser's preconditioning and
// the plan's linear update in one pass over memory.
//
//   g        = u + w * (c - u)               (guided: out = [u; c], 2n elements)   or   g = out   (n elements)
//              w = guidance_scale, or on the CPU per sample: guidance_rows[i / row_size] (float32 [n / row_size],
//              e.g. a Pipeline runtime's per-sample scales; guidance_rows == 0: the number)
//   denoised = c_skip * point + c_out * g     (c_skip == 0: c_out * g, as blitzdiff.engine.denoiser.Denoiser)
//   x_next   = sum_k coefs[k] * T_k           (in list order; T_k = *terms[k], or the new denoised where terms[k] == 0)
//
// `terms` lists the live terms of the plan's update in the sampling loop's order (x, D_0 .. D_3, P_0 .. P_3,
// noise; zero coefficients already dropped on the host), at most kMaxSolverStepTerms. Every buffer is contiguous
// with n elements of the one dtype `dtype` ("float32", "float64"; the CUDA kernel also takes "float16" and
// "bfloat16"); pointers arrive as integers (Tensor.data_ptr()) so the module never links to torch. The outputs
// must not overlap any input; inputs may alias each other. Half types compute in float32, the others in their
// own precision; the D_0 term reads the denoised value as stored (rounded to dtype). The CPU kernel splits large
// calls over up to `threads` threads (parallel.h) in whole chunks: the same bits for any count, and takes
// denoised == 0 (not stored: the loop's stages whose estimate no later stage reads). Bad arguments throw
// std::invalid_argument (ValueError in Python), CUDA failures std::runtime_error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace blitzdiff {

constexpr int kMaxSolverStepTerms = 10;  // x, D_0 .. D_3, P_0 .. P_3, noise

void solver_step_cpu(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
                     std::int64_t n, bool guided, const std::string& dtype, double c_skip, double c_out,
                     double guidance_scale, const std::vector<std::uintptr_t>& terms,
                     const std::vector<double>& coefs, std::int64_t threads, std::uintptr_t guidance_rows,
                     std::int64_t row_size);

#ifdef BLITZDIFF_WITH_CUDA
// Enqueues the kernel on `stream` (a cudaStream_t as an integer) of the device whose context is current; does not
// synchronize, so it is safe inside CUDA graph capture.
void solver_step_cuda(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
                      std::int64_t n, bool guided, const std::string& dtype, double c_skip, double c_out,
                      double guidance_scale, const std::vector<std::uintptr_t>& terms,
                      const std::vector<double>& coefs, std::uintptr_t stream);
#endif

// Throws std::invalid_argument unless n >= 0, terms and coefs have the same length <= kMaxSolverStepTerms and,
// for n > 0, the output, out and point pointers are non-null (denoised may be null where denoised_optional).
void check_solver_step_args(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
                            std::int64_t n, const std::vector<std::uintptr_t>& terms,
                            const std::vector<double>& coefs, bool denoised_optional = false);

}  // namespace blitzdiff
