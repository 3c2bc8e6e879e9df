// CUDA kernels for the fused GroupNorm; see group_norm.h for the contract and the formula.
//
// Three launches on one stream, scratch in the caller's workspace:
//   1. moments: grid (B * G * parts); a block takes a contiguous slice of one group's Cg * S values (a group is one
//      run of memory channels-first, Cg-wide column strips of [S, C] rows channels-last), each thread merging
//      batches of 4 loads into its (n, mean, m2) (Chan et al.), then a fixed-order warp / block merge. One read of x.
//   2. coefficients: one thread per (b, c) merges its group's parts in order and writes mean, a = rstd * weight *
//      (1 + scale), k = bias * (1 + scale) + shift (float64 math, rounded once).
//   3. apply: grid over B * (C * S / 2048); 8 coalesced elements per thread, y = (x - mean) * a + k, SiLU,
//      residual, rounded once to T. One read of x (and the residual), one write.
// Moments and the element pass are in float32 (float64 for float64 data). The partition and the merge order are
// fixed, so results are bitwise repeatable. Indices within a sample are 32-bit (C * S < 2^31, checked); divisions
// by C, S and Cg use precomputed multiply-shift dividers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "element_io.cuh"
#include "group_norm.h"

namespace blitzdiff {
namespace {

constexpr int kThreads = 256;
constexpr int kBatch = 4;                         // loads per thread per moments step
constexpr int kItems = 8;                         // elements per thread in the apply pass
constexpr std::int64_t kMomentsSlice = 4096;      // values per moments block (fewer when parts hit kMaxParts)
constexpr std::int64_t kMaxParts = 64;            // moments blocks per group
constexpr std::int64_t kAlign = 256;              // workspace sections start at this byte alignment

__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

__device__ __forceinline__ void narrow(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void narrow(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void narrow(float* p, float v) { *p = v; }
__device__ __forceinline__ void narrow(double* p, double v) { *p = v; }

// n / d and n % d for 0 <= n < 2^31 by a multiply and a shift (Granlund & Montgomery; PyTorch's IntDivider).
struct Divider {
  std::uint32_t divisor, magic, shift;
  explicit Divider(std::uint32_t d) : divisor(d), magic(0), shift(0) {
    while ((std::uint64_t{1} << shift) < d) ++shift;
    magic = static_cast<std::uint32_t>(((std::uint64_t{1} << 32) * ((std::uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ std::uint32_t div(std::uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
  __device__ __forceinline__ std::uint32_t mod(std::uint32_t n) const { return n - div(n) * divisor; }
};

template <typename A>
struct Moments {
  A n, mean, m2;
};

template <typename A>
__device__ __forceinline__ void merge(Moments<A>& a, const Moments<A>& b) {
  if (b.n == A(0)) return;
  const A n = a.n + b.n, delta = b.mean - a.mean;
  a.mean += delta * (b.n / n);
  a.m2 += b.m2 + delta * delta * (a.n * b.n / n);
  a.n = n;
}

template <typename A>
__device__ __forceinline__ Moments<A> shuffle_down(const Moments<A>& m, int offset) {
  return {__shfl_down_sync(0xFFFFFFFFu, m.n, offset), __shfl_down_sync(0xFFFFFFFFu, m.mean, offset),
          __shfl_down_sync(0xFFFFFFFFu, m.m2, offset)};
}

// Offset of value i (0 <= i < Cg * S) of group (b, g) from x.
struct GroupIndex {
  std::int64_t sample_stride;  // C * S
  std::uint32_t group_channels, channels, spatial;
  Divider by_group_channels;
  bool channels_last;
  __device__ __forceinline__ std::int64_t operator()(std::int64_t b, std::uint32_t g, std::uint32_t i) const {
    const std::int64_t base = b * sample_stride;
    if (!channels_last) return base + static_cast<std::int64_t>(g) * group_channels * spatial + i;
    const std::uint32_t s = by_group_channels.div(i);
    return base + static_cast<std::int64_t>(s) * channels + g * group_channels + (i - s * group_channels);
  }
};

// Block bg_p = (b * G + g) * parts + p: the moments of values [p * slice, min(L, (p + 1) * slice)) of group (b, g).
template <typename T>
__global__ void __launch_bounds__(kThreads) moments_kernel(const T* __restrict__ x, GroupIndex index,
                                                           std::uint32_t groups, std::uint32_t parts,
                                                           std::uint32_t slice, Moments<typename Acc<T>::type>* part) {
  using A = typename Acc<T>::type;
  const std::uint32_t bg = blockIdx.x / parts, p = blockIdx.x % parts;
  const std::int64_t b = bg / groups;
  const std::uint32_t g = bg % groups;
  const std::uint32_t size = index.group_channels * index.spatial;
  const std::uint32_t begin = p * slice, end = min(size, begin + slice);
  Moments<A> acc{A(0), A(0), A(0)};
  for (std::uint32_t first = begin + threadIdx.x; first < end; first += kBatch * kThreads) {
    // Values first + j * kThreads: the valid ones are a prefix (j < count), loaded together for memory parallelism.
    A v[kBatch];
    int count = 0;
    A sum = 0;
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const std::uint32_t i = first + j * kThreads;
      v[j] = i < end ? A(widen(x[index(b, g, i)])) : A(0);
      count += i < end;
      sum += v[j];
    }
    const A mean = sum / A(count);
    A m2 = 0;
#pragma unroll
    for (int j = 0; j < kBatch; ++j) m2 += j < count ? (v[j] - mean) * (v[j] - mean) : A(0);
    merge(acc, Moments<A>{A(count), mean, m2});
  }
  // Fixed-order reductions: within each warp by shuffles, then warp 0 over the warps' results.
  __shared__ Moments<A> warp_moments[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    const Moments<A> other = shuffle_down(acc, offset);
    merge(acc, other);
  }
  if (threadIdx.x % 32 == 0) warp_moments[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Moments<A> total = warp_moments[0];
    for (int w = 1; w < kThreads / 32; ++w) merge(total, warp_moments[w]);
    part[blockIdx.x] = total;
  }
}

// Thread (b, c): coef[0][b, c] = mean, coef[1][b, c] = a, coef[2][b, c] = k (see the file comment); merged and
// computed in float64 (a few values per thread), then rounded once to A.
template <typename A, typename P>
__global__ void coefficients_kernel(const Moments<A>* __restrict__ part, const P* __restrict__ weight,
                                    const P* __restrict__ bias, const P* __restrict__ scale, std::int64_t scale_stride,
                                    const P* __restrict__ shift, std::int64_t shift_stride, std::int64_t batch,
                                    std::int64_t channels, std::int64_t group_channels, std::int64_t parts, double eps,
                                    A* __restrict__ coef) {
  const std::int64_t bc = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bc >= batch * channels) return;
  const std::int64_t b = bc / channels, c = bc % channels;
  const Moments<A>* mine = part + (b * (channels / group_channels) + c / group_channels) * parts;
  Moments<double> total{mine[0].n, mine[0].mean, mine[0].m2};
  for (std::int64_t p = 1; p < parts; ++p) merge(total, Moments<double>{mine[p].n, mine[p].mean, mine[p].m2});
  const double rstd = 1.0 / sqrt(total.m2 / total.n + eps);
  const double w = weight ? double(widen(weight[c])) : 1.0;
  const double factor = 1.0 + (scale ? double(widen(scale[b * scale_stride + c])) : 0.0);
  const double bias_c = bias ? double(widen(bias[c])) : 0.0;
  const double k = bias_c * factor + (shift ? double(widen(shift[b * shift_stride + c])) : 0.0);
  coef[bc] = static_cast<A>(total.mean);
  coef[batch * channels + bc] = static_cast<A>(rstd * w * factor);
  coef[2 * batch * channels + bc] = static_cast<A>(k);
}

__device__ __forceinline__ float silu(float y) { return y / (1.0f + expf(-y)); }
__device__ __forceinline__ double silu(double y) { return y / (1.0 + exp(-y)); }

// Block: a range of kItems * kThreads consecutive elements of one sample.
template <typename T, bool kSilu, bool kResidual, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) apply_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                         const T* __restrict__ residual,
                                                         const typename Acc<T>::type* __restrict__ coef,
                                                         std::int64_t batch, std::uint32_t channels,
                                                         std::uint32_t sample_size, std::uint32_t blocks_per_sample,
                                                         Divider channel_of) {
  using A = typename Acc<T>::type;
  const std::int64_t b = blockIdx.x / blocks_per_sample;
  const std::uint32_t first = (blockIdx.x % blocks_per_sample) * (kItems * kThreads) + threadIdx.x;
  const std::int64_t base = b * sample_size, bc = batch * channels;
  const A* mean = coef + b * channels;
  const A* a = coef + bc + b * channels;
  const A* k = coef + 2 * bc + b * channels;
  // All loads of the thread first (memory-level parallelism), then the math and the stores.
  A v[kItems], r[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const std::uint32_t i = first + j * kThreads;
    v[j] = i < sample_size ? A(widen(x[base + i])) : A(0);
    if constexpr (kResidual) r[j] = i < sample_size ? A(widen(residual[base + i])) : A(0);
  }
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const std::uint32_t i = first + j * kThreads;
    if (i >= sample_size) break;
    // channels-first: i = c * S + s (channel_of divides by S); channels-last: i = s * C + c (takes i mod C).
    const std::uint32_t c = kChannelsLast ? channel_of.mod(i) : channel_of.div(i);
    A y = (v[j] - __ldg(mean + c)) * __ldg(a + c) + __ldg(k + c);
    if constexpr (kSilu) y = silu(y);
    if constexpr (kResidual) y += r[j];
    narrow(out + base + i, y);
  }
}

struct Plan {
  std::int64_t parts, slice, part_bytes, coef_bytes;
};

Plan plan(std::int64_t batch, std::int64_t channels, std::int64_t spatial, std::int64_t groups, std::size_t acc_size) {
  const std::int64_t size = channels / groups * spatial;
  const std::int64_t parts = std::clamp<std::int64_t>((size + kMomentsSlice - 1) / kMomentsSlice, 1, kMaxParts);
  const std::int64_t slice = (size + parts - 1) / parts;
  const std::int64_t part_bytes = (batch * groups * parts * 3 * static_cast<std::int64_t>(acc_size) + kAlign - 1) /
                                  kAlign * kAlign;
  return {parts, slice, part_bytes, 3 * batch * channels * static_cast<std::int64_t>(acc_size)};
}

void check_launch(const char* what) {
  // Launch-configuration errors only; asynchronous faults surface at the caller's next synchronization.
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    throw std::runtime_error(std::string("group_norm_cuda: ") + what + " launch failed: " + cudaGetErrorString(err));
  }
}

struct Args {
  std::uintptr_t out, x, weight, bias, scale, shift, residual, workspace;
  std::int64_t scale_stride, shift_stride, batch, channels, spatial, groups;
  double eps;
  bool channels_last, silu;
  cudaStream_t stream;
};

template <typename T, bool kSilu, bool kResidual>
void launch_apply(const Args& args, const typename Acc<T>::type* coef) {
  const auto sample = static_cast<std::uint32_t>(args.channels * args.spatial);
  const std::uint32_t per_sample = (sample + kItems * kThreads - 1) / (kItems * kThreads);
  const auto blocks = static_cast<unsigned>(args.batch * per_sample);
  const auto* x = reinterpret_cast<const T*>(args.x);
  const auto* res = reinterpret_cast<const T*>(args.residual);
  auto* out = reinterpret_cast<T*>(args.out);
  const auto channels = static_cast<std::uint32_t>(args.channels);
  if (args.channels_last) {
    apply_kernel<T, kSilu, kResidual, true><<<blocks, kThreads, 0, args.stream>>>(
        out, x, res, coef, args.batch, channels, sample, per_sample, Divider(channels));
  } else {
    apply_kernel<T, kSilu, kResidual, false><<<blocks, kThreads, 0, args.stream>>>(
        out, x, res, coef, args.batch, channels, sample, per_sample, Divider(static_cast<std::uint32_t>(args.spatial)));
  }
}

template <typename T, typename P>
void run(const Args& args) {
  using A = typename Acc<T>::type;
  const Plan pl = plan(args.batch, args.channels, args.spatial, args.groups, sizeof(A));
  auto* part = reinterpret_cast<Moments<A>*>(args.workspace);
  auto* coef = reinterpret_cast<A*>(args.workspace + pl.part_bytes);
  const auto group_channels = static_cast<std::uint32_t>(args.channels / args.groups);
  const GroupIndex index{args.channels * args.spatial, group_channels, static_cast<std::uint32_t>(args.channels),
                         static_cast<std::uint32_t>(args.spatial), Divider(group_channels), args.channels_last};
  moments_kernel<T><<<static_cast<unsigned>(args.batch * args.groups * pl.parts), kThreads, 0, args.stream>>>(
      reinterpret_cast<const T*>(args.x), index, static_cast<std::uint32_t>(args.groups),
      static_cast<std::uint32_t>(pl.parts), static_cast<std::uint32_t>(pl.slice), part);
  check_launch("moments");
  const std::int64_t bc = args.batch * args.channels;
  coefficients_kernel<A, P><<<static_cast<unsigned>((bc + kThreads - 1) / kThreads), kThreads, 0, args.stream>>>(
      part, reinterpret_cast<const P*>(args.weight), reinterpret_cast<const P*>(args.bias),
      reinterpret_cast<const P*>(args.scale), args.scale_stride, reinterpret_cast<const P*>(args.shift),
      args.shift_stride, args.batch, args.channels, group_channels, pl.parts, args.eps, coef);
  check_launch("coefficients");
  if (args.silu && args.residual) {
    launch_apply<T, true, true>(args, coef);
  } else if (args.silu) {
    launch_apply<T, true, false>(args, coef);
  } else if (args.residual) {
    launch_apply<T, false, true>(args, coef);
  } else {
    launch_apply<T, false, false>(args, coef);
  }
  check_launch("apply");
}

std::size_t acc_size(const std::string& dtype) {
  if (dtype == "float32" || dtype == "float16" || dtype == "bfloat16") return sizeof(float);
  if (dtype == "float64") return sizeof(double);
  throw std::invalid_argument("group_norm_cuda: dtype must be float16, bfloat16, float32 or float64, got '" + dtype +
                              "'");
}

}  // namespace

std::int64_t group_norm_cuda_workspace(std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                                       std::int64_t groups, const std::string& dtype) {
  check_group_norm_args(1, 1, batch, channels, spatial, groups);
  const Plan pl = plan(batch, channels, spatial, groups, acc_size(dtype));
  return pl.part_bytes + pl.coef_bytes;
}

void group_norm_cuda(std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias,
                     std::uintptr_t scale, std::int64_t scale_stride, std::uintptr_t shift, std::int64_t shift_stride,
                     std::uintptr_t residual, std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                     std::int64_t groups, double eps, bool channels_last, bool silu, const std::string& dtype,
                     const std::string& param_dtype, std::uintptr_t workspace, std::int64_t workspace_bytes,
                     std::uintptr_t stream) {
  check_group_norm_args(out, x, batch, channels, spatial, groups);
  if (batch * channels * spatial == 0) return;  // a zero-block launch is an error
  if (channels * spatial >= (std::int64_t{1} << 31)) {
    throw std::invalid_argument("group_norm_cuda: a sample must have fewer than 2^31 elements");
  }
  if (workspace == 0 || workspace_bytes < group_norm_cuda_workspace(batch, channels, spatial, groups, dtype)) {
    throw std::invalid_argument("group_norm_cuda: workspace is missing or smaller than group_norm_cuda_workspace()");
  }
  const Args args{out, x, weight, bias, scale, shift, residual, workspace, scale_stride, shift_stride, batch, channels,
                  spatial, groups, eps, channels_last, silu, reinterpret_cast<cudaStream_t>(stream)};
  const bool same = param_dtype == dtype;
  const bool acc = param_dtype == (dtype == "float64" ? "float64" : "float32");
  if (!same && !acc) {
    throw std::invalid_argument("group_norm_cuda: param_dtype must be the dtype or its accumulation type, got '" +
                                param_dtype + "' for '" + dtype + "'");
  }
  if (dtype == "float32") {
    run<float, float>(args);
  } else if (dtype == "float64") {
    run<double, double>(args);
  } else if (dtype == "float16") {
    same ? run<__half, __half>(args) : run<__half, float>(args);
  } else if (dtype == "bfloat16") {
    same ? run<__nv_bfloat16, __nv_bfloat16>(args) : run<__nv_bfloat16, float>(args);
  } else {
    acc_size(dtype);  // throws the dtype error
  }
}

}  // namespace blitzdiff
