// CUDA kernel for the fused solver update; see solver_update.h for the contract.
// Memory-bound (3-5 loads + 1 store per element, no reuse): a coalesced grid-stride loop, one element per thread
// per iteration, accumulating in float32 (half types, float32) or float64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "element_io.cuh"
#include "solver_update.h"

namespace blitzdiff {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 65536;  // grid-stride covers the rest; keeps the grid size in range

template <typename T, bool kHasD1, bool kHasNoise>
__global__ void update(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ d0,
                       const T* __restrict__ d1, const T* __restrict__ noise, std::int64_t n,
                       typename Acc<T>::type a, typename Acc<T>::type b, typename Acc<T>::type c,
                       typename Acc<T>::type s) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    auto acc = a * load(x, i) + b * load(d0, i);
    if constexpr (kHasD1) acc += c * load(d1, i);
    if constexpr (kHasNoise) acc += s * load(noise, i);
    store(out, i, acc);
  }
}

template <typename T>
void launch(std::uintptr_t out, std::uintptr_t x, std::uintptr_t d0, std::uintptr_t d1, std::uintptr_t noise,
            std::int64_t n, double a, double b, double c, double s, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  auto* o = reinterpret_cast<T*>(out);
  const auto* px = reinterpret_cast<const T*>(x);
  const auto* p0 = reinterpret_cast<const T*>(d0);
  const auto* p1 = reinterpret_cast<const T*>(d1);
  const auto* pn = reinterpret_cast<const T*>(noise);
  const A ta = static_cast<A>(a), tb = static_cast<A>(b), tc = static_cast<A>(c), ts = static_cast<A>(s);
  const auto blocks = static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
  if (p1 && pn) {
    update<T, true, true><<<blocks, kThreads, 0, stream>>>(o, px, p0, p1, pn, n, ta, tb, tc, ts);
  } else if (p1) {
    update<T, true, false><<<blocks, kThreads, 0, stream>>>(o, px, p0, p1, pn, n, ta, tb, tc, ts);
  } else if (pn) {
    update<T, false, true><<<blocks, kThreads, 0, stream>>>(o, px, p0, p1, pn, n, ta, tb, tc, ts);
  } else {
    update<T, false, false><<<blocks, kThreads, 0, stream>>>(o, px, p0, p1, pn, n, ta, tb, tc, ts);
  }
}

}  // namespace

void solver_update_cuda(std::uintptr_t out, std::uintptr_t x, std::uintptr_t d0, std::uintptr_t d1,
                        std::uintptr_t noise, std::int64_t n, const std::string& dtype, double a, double b, double c,
                        double s, std::uintptr_t stream) {
  check_solver_update_args(out, x, d0, n);
  if (n == 0) return;  // a zero-block launch is an error
  auto* st = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == "float32") {
    launch<float>(out, x, d0, d1, noise, n, a, b, c, s, st);
  } else if (dtype == "float64") {
    launch<double>(out, x, d0, d1, noise, n, a, b, c, s, st);
  } else if (dtype == "float16") {
    launch<__half>(out, x, d0, d1, noise, n, a, b, c, s, st);
  } else if (dtype == "bfloat16") {
    launch<__nv_bfloat16>(out, x, d0, d1, noise, n, a, b, c, s, st);
  } else {
    throw std::invalid_argument("solver_update_cuda: dtype must be float16, bfloat16, float32 or float64, got '" +
                                dtype + "'");
  }
  // Launch-configuration errors only; asynchronous faults surface at the caller's next synchronization.
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    throw std::runtime_error(std::string("solver_update_cuda: kernel launch failed: ") + cudaGetErrorString(err));
  }
}

}  // namespace blitzdiff
