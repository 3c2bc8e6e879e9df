// CUDA kernel for the fused solver step; see solver_step.h for the contract.
// Memory-bound (2-11 loads and 2 stores per element, no reuse): a coalesced grid-stride loop, one element per
// thread per iteration. The live terms arrive by value in a small struct; every thread walks the same term list,
// so the loop over terms never diverges.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "element_io.cuh"
#include "solver_step.h"

namespace blitzdiff {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 65536;  // grid-stride covers the rest; keeps the grid size in range

__device__ inline __half to_storage(float v, const __half*) { return __float2half_rn(v); }
__device__ inline __nv_bfloat16 to_storage(float v, const __nv_bfloat16*) { return __float2bfloat16_rn(v); }
__device__ inline float to_storage(float v, const float*) { return v; }
__device__ inline double to_storage(double v, const double*) { return v; }

template <typename T>
struct Terms {
  const T* ptr[kMaxSolverStepTerms];  // nullptr: the new denoised (D_0)
  typename Acc<T>::type coef[kMaxSolverStepTerms];
  int count;
};

template <typename T, bool kGuided, bool kSkip>
__global__ void step(T* __restrict__ denoised, T* __restrict__ x_next, const T* __restrict__ out,
                     const T* __restrict__ point, std::int64_t n, typename Acc<T>::type c_skip,
                     typename Acc<T>::type c_out, typename Acc<T>::type w, const Terms<T> terms) {
  using A = typename Acc<T>::type;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    A g = load(out, i);
    if constexpr (kGuided) g = g + w * (load(out, n + i) - g);  // out = [u; c]
    A d = kSkip ? load(point, i) * c_skip + c_out * g : g * c_out;
    const T stored = to_storage(d, denoised);
    denoised[i] = stored;
    d = load(&stored, 0);  // the D_0 term reads the denoised value as stored
    A acc = 0;  // 0 + coef * t == coef * t: the loop's first term
#pragma unroll
    for (int k = 0; k < kMaxSolverStepTerms; ++k) {
      if (k < terms.count) acc += terms.coef[k] * (terms.ptr[k] == nullptr ? d : load(terms.ptr[k], i));
    }
    x_next[i] = to_storage(acc, x_next);
  }
}

template <typename T>
void launch(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point, std::int64_t n,
            bool guided, double c_skip, double c_out, double guidance_scale,
            const std::vector<std::uintptr_t>& ptrs, const std::vector<double>& coefs, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  Terms<T> terms{};
  terms.count = static_cast<int>(ptrs.size());
  for (std::size_t k = 0; k < ptrs.size(); ++k) {
    terms.ptr[k] = reinterpret_cast<const T*>(ptrs[k]);
    terms.coef[k] = static_cast<A>(coefs[k]);
  }
  auto* d = reinterpret_cast<T*>(denoised);
  auto* xn = reinterpret_cast<T*>(x_next);
  const auto* o = reinterpret_cast<const T*>(out);
  const auto* p = reinterpret_cast<const T*>(point);
  const A skip = static_cast<A>(c_skip), cout = static_cast<A>(c_out), w = static_cast<A>(guidance_scale);
  const auto blocks = static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
  const bool has_skip = c_skip != 0.0;
  if (guided && has_skip) {
    step<T, true, true><<<blocks, kThreads, 0, stream>>>(d, xn, o, p, n, skip, cout, w, terms);
  } else if (guided) {
    step<T, true, false><<<blocks, kThreads, 0, stream>>>(d, xn, o, p, n, skip, cout, w, terms);
  } else if (has_skip) {
    step<T, false, true><<<blocks, kThreads, 0, stream>>>(d, xn, o, p, n, skip, cout, w, terms);
  } else {
    step<T, false, false><<<blocks, kThreads, 0, stream>>>(d, xn, o, p, n, skip, cout, w, terms);
  }
}

}  // namespace

void solver_step_cuda(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
                      std::int64_t n, bool guided, const std::string& dtype, double c_skip, double c_out,
                      double guidance_scale, const std::vector<std::uintptr_t>& terms,
                      const std::vector<double>& coefs, std::uintptr_t stream) {
  check_solver_step_args(denoised, x_next, out, point, n, terms, coefs);
  if (n == 0) return;  // a zero-block launch is an error
  auto* st = reinterpret_cast<cudaStream_t>(stream);
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    launch<T>(denoised, x_next, out, point, n, guided, c_skip, c_out, guidance_scale, terms, coefs, st);
  };
  if (dtype == "float32") {
    run(float{});
  } else if (dtype == "float64") {
    run(double{});
  } else if (dtype == "float16") {
    run(__half{});
  } else if (dtype == "bfloat16") {
    run(__nv_bfloat16{});
  } else {
    throw std::invalid_argument("solver_step_cuda: dtype must be float16, bfloat16, float32 or float64, got '" +
                                dtype + "'");
  }
  // Launch-configuration errors only; asynchronous faults surface at the caller's next synchronization.
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    throw std::runtime_error(std::string("solver_step_cuda: kernel launch failed: ") + cudaGetErrorString(err));
  }
}

}  // namespace blitzdiff
