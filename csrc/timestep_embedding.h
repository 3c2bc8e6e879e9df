// Sinusoidal timestep embedding (diffusers' get_timestep_embedding; see blitzdiff/kernels/timestep_embedding.py):
//
//   arg[b, j] = scale * (float(t[b]) * freqs[j]),  j < half
//   out[b]    = [sin(arg), cos(arg)]  ([cos, sin] with flip), zero-padded to dim when dim is odd
//
// out is float32 [batch, dim], contiguous; timesteps are read at t[b * t_stride] (0: one timestep for the batch)
// in the dtype `t_dtype` names ("int64", "int32", "float32", "float64"), converted to float32 with round-to-
// nearest as torch's .float() does; freqs is the float32 frequency table [half] (computed once by the caller, the
// same torch ops as the spec, so both see the same bits). scale is rounded to float32. Pointers are integers
// (Tensor.data_ptr()): the module never links to torch. Bad arguments throw std::invalid_argument (ValueError in
// Python), CUDA failures std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

namespace blitzdiff {

void timestep_embedding_cpu(std::uintptr_t out, std::uintptr_t timesteps, std::int64_t t_stride,
                            const std::string& t_dtype, std::uintptr_t freqs, std::int64_t batch, std::int64_t dim,
                            bool flip_sin_to_cos, double scale, std::int64_t threads);

#ifdef BLITZDIFF_WITH_CUDA
// Enqueued on `stream` (a cudaStream_t as an integer) of the current device; no synchronization (graph-capturable).
void timestep_embedding_cuda(std::uintptr_t out, std::uintptr_t timesteps, std::int64_t t_stride,
                             const std::string& t_dtype, std::uintptr_t freqs, std::int64_t batch, std::int64_t dim,
                             bool flip_sin_to_cos, double scale, std::uintptr_t stream);
#endif

// Throws std::invalid_argument unless batch >= 0, dim >= 0, t_stride >= 0 and, for a non-empty output, the
// pointers are non-null (freqs may be null when dim < 2: there are no frequencies).
void check_timestep_embedding_args(std::uintptr_t out, std::uintptr_t timesteps, std::uintptr_t freqs,
                                   std::int64_t t_stride, std::int64_t batch, std::int64_t dim);

}  // namespace blitzdiff
