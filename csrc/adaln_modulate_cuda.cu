// CUDA kernels for adaLN modulation and the gated residual; see adaln_modulate.h for the contract.
//
// adaln_modulate: one warp per row (token), kWarps rows per block, grid-stride over rows. Lanes stride the row
// (coalesced), reduce with shuffles (no shared memory, no block barrier); the statistics pass re-reads the row,
// which the first pass left in L1, so DRAM sees x once. Statistics in float32 (float64 for float64), two-pass.
// adaln_gated_residual: one block per row, threads stride the row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "element_io.cuh"
#include "adaln_modulate.h"

namespace blitzdiff {
namespace {

constexpr int kWarps = 4;  // rows per block of adaln_modulate
constexpr int kGatedThreads = 256;
constexpr std::int64_t kMaxBlocks = 65536;  // grid-stride covers the rest

template <typename A>
__device__ inline A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every lane holds the sum
}

template <typename T>
__global__ void modulate(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ shift,
                         const T* __restrict__ scale, std::int64_t rows, std::int64_t tokens, std::int64_t dim,
                         std::int64_t param_stride, typename Acc<T>::type eps) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x % 32;
  const std::int64_t row_stride = static_cast<std::int64_t>(gridDim.x) * kWarps;
  // `row` is uniform across a warp, so every lane takes part in each shuffle.
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += row_stride) {
    const T* xr = x + row * dim;
    // Sums of x - x[0] (shifted data): a row whose mean is far from 0 next to its spread (x ~ 100 +- 3) loses no
    // digits to the sum's magnitude. A plain float32 sum of D = 7 such values was 3.5x PyTorch's error (H200).
    const A pivot = load(xr, 0);
    A sum = 0;
    for (std::int64_t i = lane; i < dim; i += 32) sum += load(xr, i) - pivot;
    const A mean = pivot + warp_sum(sum) / static_cast<A>(dim);
    A squares = 0;
    for (std::int64_t i = lane; i < dim; i += 32) {
      const A c = load(xr, i) - mean;
      squares += c * c;
    }
    const A rstd = A(1) / sqrt(warp_sum(squares) / static_cast<A>(dim) + eps);
    const std::int64_t b = row / tokens;
    const T* sh = shift + b * param_stride;
    const T* sc = scale + b * param_stride;
    T* o = out + row * dim;
    for (std::int64_t i = lane; i < dim; i += 32) {
      store(o, i, (load(xr, i) - mean) * rstd * (A(1) + load(sc, i)) + load(sh, i));
    }
  }
}

template <typename T>
__global__ void gated(T* __restrict__ out, const T* __restrict__ residual, const T* __restrict__ y,
                      const T* __restrict__ gate, std::int64_t rows, std::int64_t tokens, std::int64_t dim,
                      std::int64_t param_stride) {
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* g = gate + (row / tokens) * param_stride;
    const std::int64_t base = row * dim;
    for (std::int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      store(out, base + i, load(residual, base + i) + load(g, i) * load(y, base + i));
    }
  }
}

void check_launch(const char* op) {
  // Launch-configuration errors only; asynchronous faults surface at the caller's next synchronization.
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    throw std::runtime_error(std::string(op) + ": kernel launch failed: " + cudaGetErrorString(err));
  }
}

// Calls fn(T{}) for the element type named by dtype.
template <typename Fn>
void dispatch(const char* op, const std::string& dtype, Fn&& fn) {
  if (dtype == "float32") {
    fn(float{});
  } else if (dtype == "float64") {
    fn(double{});
  } else if (dtype == "float16") {
    fn(__half{});
  } else if (dtype == "bfloat16") {
    fn(__nv_bfloat16{});
  } else {
    throw std::invalid_argument(std::string(op) + ": dtype must be float16, bfloat16, float32 or float64, got '" +
                                dtype + "'");
  }
}

}  // namespace

void adaln_modulate_cuda(std::uintptr_t out, std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                         std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride,
                         double eps, const std::string& dtype, std::uintptr_t stream) {
  check_adaln_args("adaln_modulate", out, x, shift, scale, rows, tokens, dim, param_stride);
  if (rows == 0) return;  // a zero-block launch is an error
  const auto blocks = static_cast<unsigned>(std::min((rows + kWarps - 1) / kWarps, kMaxBlocks));
  dispatch("adaln_modulate_cuda", dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    modulate<T><<<blocks, kWarps * 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<T*>(out), reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(shift),
        reinterpret_cast<const T*>(scale), rows, tokens, dim, param_stride, static_cast<A>(eps));
  });
  check_launch("adaln_modulate_cuda");
}

void adaln_gated_residual_cuda(std::uintptr_t out, std::uintptr_t residual, std::uintptr_t y, std::uintptr_t gate,
                               std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride,
                               const std::string& dtype, std::uintptr_t stream) {
  check_adaln_args("adaln_gated_residual", out, residual, y, gate, rows, tokens, dim, param_stride);
  if (rows == 0) return;
  const auto blocks = static_cast<unsigned>(std::min(rows, kMaxBlocks));
  // Narrow rows get a narrower block (a multiple of the warp size) so that few threads idle.
  const int threads = static_cast<int>(std::min<std::int64_t>(kGatedThreads, (dim + 31) / 32 * 32));
  dispatch("adaln_gated_residual_cuda", dtype, [&](auto tag) {
    using T = decltype(tag);
    gated<T><<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<T*>(out), reinterpret_cast<const T*>(residual), reinterpret_cast<const T*>(y),
        reinterpret_cast<const T*>(gate), rows, tokens, dim, param_stride);
  });
  check_launch("adaln_gated_residual_cuda");
}

}  // namespace blitzdiff
