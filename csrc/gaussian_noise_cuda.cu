// CUDA kernel for the per-sample Gaussian noise; see gaussian_noise.h for the contract and the formula.
// Compute-bound (four hashes, a log, a cos and a sqrt per element, one store): blockIdx.y walks the samples, so a
// thread derives its sample's keys once, then a coalesced grid-stride loop over the row. logf / cosf / sqrtf are
// the accurate (non fast-math) versions, as in PyTorch's own CUDA log / cos.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "gaussian_noise.h"

namespace blitzdiff {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocksX = 65536;  // grid-stride covers the rest of a row
constexpr std::int64_t kMaxBlocksY = 65535;  // gridDim.y limit; grid-stride covers the rest of the batch

__device__ inline void store(__half* p, std::int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ inline void store(__nv_bfloat16* p, std::int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ inline void store(float* p, std::int64_t i, float v) { p[i] = v; }
__device__ inline void store(double* p, std::int64_t i, float v) { p[i] = static_cast<double>(v); }

template <typename T>
__global__ void gaussian(T* __restrict__ out, const std::int64_t* __restrict__ seeds, std::int64_t batch,
                         std::int64_t count, std::uint32_t stream) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const NoiseKeys keys = noise_keys(seeds[b], stream);
    T* row = out + b * count;
    for (std::int64_t k = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < count;
         k += stride) {
      const float radius_u = bits_to_uniform(noise_bits(keys, static_cast<std::uint64_t>(k)));
      const float angle_u = bits_to_uniform(noise_bits(keys, static_cast<std::uint64_t>(count + k)));
      // __fmul_rn: the angle is rounded once, as the spec materializes it; nvcc must not fuse this product into an
      // FMA with cosf's inlined argument reduction. (-2 * log is exact, so contraction cannot change it.)
      store(row, k, sqrtf(-2.0f * logf(radius_u)) * cosf(__fmul_rn(kTwoPi, angle_u)));
    }
  }
}

__global__ void bits(std::int64_t* __restrict__ out, const std::int64_t* __restrict__ seeds, std::int64_t batch,
                     std::uint32_t stream, std::int64_t first, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const NoiseKeys keys = noise_keys(seeds[b], stream);
    for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
      out[b * n + j] = noise_bits(keys, static_cast<std::uint64_t>(first + j));
    }
  }
}

dim3 grid(std::int64_t batch, std::int64_t count) {
  return dim3(static_cast<unsigned>(std::min((count + kThreads - 1) / kThreads, kMaxBlocksX)),
              static_cast<unsigned>(std::min(batch, kMaxBlocksY)));
}

void check_launch(const char* name) {
  // Launch-configuration errors only; asynchronous faults surface at the caller's next synchronization.
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    throw std::runtime_error(std::string(name) + ": kernel launch failed: " + cudaGetErrorString(err));
  }
}

}  // namespace

void gaussian_noise_cuda(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t count,
                         std::int64_t stream, const std::string& dtype, std::uintptr_t cuda_stream) {
  check_gaussian_noise_args(out, seeds, batch, count, stream);
  if (batch == 0 || count == 0) return;  // a zero-block launch is an error
  const auto* s = reinterpret_cast<const std::int64_t*>(seeds);
  const auto st = static_cast<std::uint32_t>(stream);
  const dim3 blocks = grid(batch, count);
  auto* cs = reinterpret_cast<cudaStream_t>(cuda_stream);
  if (dtype == "float32") {
    gaussian<<<blocks, kThreads, 0, cs>>>(reinterpret_cast<float*>(out), s, batch, count, st);
  } else if (dtype == "float64") {
    gaussian<<<blocks, kThreads, 0, cs>>>(reinterpret_cast<double*>(out), s, batch, count, st);
  } else if (dtype == "float16") {
    gaussian<<<blocks, kThreads, 0, cs>>>(reinterpret_cast<__half*>(out), s, batch, count, st);
  } else if (dtype == "bfloat16") {
    gaussian<<<blocks, kThreads, 0, cs>>>(reinterpret_cast<__nv_bfloat16*>(out), s, batch, count, st);
  } else {
    throw std::invalid_argument("gaussian_noise_cuda: dtype must be float16, bfloat16, float32 or float64, got '" +
                                dtype + "'");
  }
  check_launch("gaussian_noise_cuda");
}

void noise_bits_cuda(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t stream,
                     std::int64_t first, std::int64_t n, std::uintptr_t cuda_stream) {
  check_noise_bits_args(out, seeds, batch, stream, first, n);
  if (batch == 0 || n == 0) return;
  bits<<<grid(batch, n), kThreads, 0, reinterpret_cast<cudaStream_t>(cuda_stream)>>>(
      reinterpret_cast<std::int64_t*>(out), reinterpret_cast<const std::int64_t*>(seeds), batch,
      static_cast<std::uint32_t>(stream), first, n);
  check_launch("noise_bits_cuda");
}

}  // namespace blitzdiff
