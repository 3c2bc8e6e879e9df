// CUDA kernel for the tanh-approximate GELU; see gelu.h for the contract.
// Memory-bound (one load and one store per element): a coalesced grid-stride loop computing x / (1 + exp(-2z)) in
// float32 (half types, float32) or float64, with the precise expf / exp (it overflows to inf for large -2z, which
// gives x * 0, as the contract says).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "element_io.cuh"
#include "gelu.h"

namespace blitzdiff {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 65536;  // grid-stride covers the rest; keeps the grid size in range

__device__ inline float gelu(float x) { return x / (1.0f + expf(-1.5957691216057308f * (x + 0.044715f * x * x * x))); }
__device__ inline double gelu(double x) { return x / (1.0 + exp(-1.5957691216057308 * (x + 0.044715 * x * x * x))); }

// out may alias x (in place): each element is read before it is written, by the same thread.
template <typename T>
__global__ void gelu_tanh(T* out, const T* x, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    store(out, i, gelu(load(x, i)));
  }
}

template <typename T>
void launch(std::uintptr_t out, std::uintptr_t x, std::int64_t n, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
  gelu_tanh<T><<<blocks, kThreads, 0, stream>>>(reinterpret_cast<T*>(out), reinterpret_cast<const T*>(x), n);
}

}  // namespace

void gelu_tanh_cuda(std::uintptr_t out, std::uintptr_t x, std::int64_t n, const std::string& dtype,
                    std::uintptr_t stream) {
  check_gelu_args(out, x, n);
  if (n == 0) return;  // a zero-block launch is an error
  auto* st = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == "float32") {
    launch<float>(out, x, n, st);
  } else if (dtype == "float64") {
    launch<double>(out, x, n, st);
  } else if (dtype == "float16") {
    launch<__half>(out, x, n, st);
  } else if (dtype == "bfloat16") {
    launch<__nv_bfloat16>(out, x, n, st);
  } else {
    throw std::invalid_argument("gelu_tanh_cuda: dtype must be float16, bfloat16, float32 or float64, got '" + dtype +
                                "'");
  }
  // Launch-configuration errors only; asynchronous faults surface at the caller's next synchronization.
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    throw std::runtime_error(std::string("gelu_tanh_cuda: kernel launch failed: ") + cudaGetErrorString(err));
  }
}

}  // namespace blitzdiff
