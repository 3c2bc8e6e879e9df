// CUDA kernel for the sinusoidal timestep embedding; see timestep_embedding.h for the contract.
// One thread per output element of [batch, dim] (grid-stride), with CUDA's accurate sinf / cosf (the module is
// built without --use_fast_math, so large arguments are range-reduced exactly, as PyTorch's own kernels do).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "timestep_embedding.h"

namespace blitzdiff {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 65536;  // grid-stride covers the rest

template <typename TS>
__global__ void embed(float* __restrict__ out, const TS* __restrict__ t, std::int64_t t_stride,
                      const float* __restrict__ freqs, std::int64_t batch, std::int64_t dim, bool flip, float scale) {
  const std::int64_t half = dim / 2, n = batch * dim;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::int64_t b = i / dim, col = i - b * dim;
    if (col >= 2 * half) {  // odd dim: the zero pad
      out[i] = 0.0f;
      continue;
    }
    const bool second = col >= half;
    const float arg = scale * (static_cast<float>(t[b * t_stride]) * freqs[second ? col - half : col]);
    out[i] = second != flip ? cosf(arg) : sinf(arg);  // [sin, cos], or [cos, sin] with flip
  }
}

}  // namespace

void timestep_embedding_cuda(std::uintptr_t out, std::uintptr_t timesteps, std::int64_t t_stride,
                             const std::string& t_dtype, std::uintptr_t freqs, std::int64_t batch, std::int64_t dim,
                             bool flip_sin_to_cos, double scale, std::uintptr_t stream) {
  check_timestep_embedding_args(out, timesteps, freqs, t_stride, batch, dim);
  const std::int64_t n = batch * dim;
  if (n == 0) return;  // a zero-block launch is an error
  const auto blocks = static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
  auto* st = reinterpret_cast<cudaStream_t>(stream);
  auto* o = reinterpret_cast<float*>(out);
  const auto* f = reinterpret_cast<const float*>(freqs);
  const auto s = static_cast<float>(scale);
  const auto run = [&](auto tag) {
    using TS = decltype(tag);
    embed<TS><<<blocks, kThreads, 0, st>>>(o, reinterpret_cast<const TS*>(timesteps), t_stride, f, batch, dim,
                                           flip_sin_to_cos, s);
  };
  if (t_dtype == "int64") {
    run(std::int64_t{});
  } else if (t_dtype == "int32") {
    run(std::int32_t{});
  } else if (t_dtype == "float32") {
    run(float{});
  } else if (t_dtype == "float64") {
    run(double{});
  } else {
    throw std::invalid_argument("timestep_embedding_cuda: timesteps must be int64, int32, float32 or float64, got '" +
                                t_dtype + "'");
  }
  // Launch-configuration errors only; asynchronous faults surface at the caller's next synchronization.
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    throw std::runtime_error(std::string("timestep_embedding_cuda: kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace blitzdiff
