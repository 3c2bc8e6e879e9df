// CPU kernel for the fused GroupNorm; see group_norm.h for the contract and the formula.
//
// Two passes over memory: chunk moments (each chunk is read twice while it sits in L1 / L2: a sum for a shift, then
// shifted sums), then one read / one write that applies y = (x - mean) * a + k, SiLU and the residual. Both passes
// split their work over up to `threads` threads (parallel.h: torch's OpenMP runtime) in a fixed partition whose
// results do not depend on the thread count: every chunk's moments are computed alone and merged per group in
// chunk order. float32 and bfloat16 data (float64 would need a vectorized exp for SiLU to beat PyTorch).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "group_norm.h"
#include "parallel.h"
#include "vectorize.h"

namespace blitzdiff {
namespace {

// The loops vectorize 4 lanes wide on baseline x86-64 (SSE2), 8 with AVX2 and 16 with AVX-512 (2x faster again on
// the SiLU pass than AVX2 on an AMD EPYC): one clone per width (vectorize.h).

constexpr std::int64_t kChunk = 4096;  // values per channels-first moments chunk: 16 KiB of float32, in L1
// Values per channels-last chunk (rows of C): larger, as each chunk ends with per-group sums over its C channel
// accumulators; 64 KiB of float32, re-read from L2.
constexpr std::int64_t kRowsChunk = 16384;
// Below this many elements per thread another thread costs more than it saves. 2^17 was sized for std::thread
// starts (~20-50 us); with OpenMP's workers (awake after torch's own ops) 2^15 splits a channels-last 8x96x16x16
// GroupNorm + SiLU (196608 values; 2 threads, Xeon): see README "Not met either".
constexpr std::int64_t kMinElementsPerThread = std::int64_t{1} << 15;

struct BFloat16 {
  std::uint16_t bits;
};

BLITZDIFF_INLINE float widen(float v) { return v; }
BLITZDIFF_INLINE float widen(BFloat16 v) {
  const std::uint32_t bits = static_cast<std::uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

BLITZDIFF_INLINE void narrow(float* p, float v) { *p = v; }
// Round to nearest even, NaN to a quiet NaN: what PyTorch's float -> bfloat16 conversion does. Integer compares
// only: a float compare may trap (-ftrapping-math, GCC's default), which keeps GCC from vectorizing the select.
BLITZDIFF_INLINE void narrow(BFloat16* p, float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const std::uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p->bits = static_cast<std::uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

BLITZDIFF_INLINE float silu(float y) { return y / (1.0f + exp_approx(-y)); }

// Count, mean and sum of squared deviations of a set of values; merged in float64 (Chan et al. 1979).
struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

void merge(Moments& a, const Moments& b) {
  if (b.n == 0) return;
  const double n = a.n + b.n, delta = b.mean - a.mean;
  a.mean += delta * (b.n / n);
  a.m2 += b.m2 + delta * delta * (a.n * b.n / n);
  a.n = n;
}

// Moments of n values from their sum (to pick a shift) and their shifted sums s1 = sum(x - shift),
// s2 = sum((x - shift)^2): the shift is within rounding of the mean, so s2 does not cancel.
Moments shifted_moments(double n, double shift, double s1, double s2) {
  return {n, shift + s1 / n, std::max(0.0, s2 - s1 * s1 / n)};
}

// Moments of a contiguous run accumulate in kColumns partial sums: the run is read as rows of kColumns values and
// summed column-wise, a loop without a reduction that GCC / Clang vectorize (without -ffast-math they may not
// reorder a scalar sum). kColumns independent sums also give pairwise-like accuracy. (Explicit GCC vector types
// lose their registers under -flto with target_clones.)
constexpr std::int64_t kColumns = 64;

BLITZDIFF_INLINE double column_sum(const float* columns) {
  double total = 0;
  for (std::int64_t j = 0; j < kColumns; ++j) total += columns[j];
  return total;
}

// Everything a call needs, with the pointers typed late (by the dispatch on dtype).
struct Job {
  void* out;
  const void *x, *weight, *bias, *scale, *shift, *residual;
  std::int64_t scale_stride, shift_stride, batch, channels, spatial, groups;
  double eps;
  bool channels_last;
};

// Moments of one contiguous run of n <= kChunk values (a channels-first chunk): sum, then shifted sums, in kColumns
// independent accumulators each.
template <typename T>
BLITZDIFF_INLINE Moments run_moments(const T* __restrict__ p, std::int64_t n) {
  const std::int64_t full = n - n % kColumns;
  float sum[kColumns] = {};
  for (std::int64_t i = 0; i < full; i += kColumns) {
    for (std::int64_t j = 0; j < kColumns; ++j) sum[j] += widen(p[i + j]);
  }
  float tail = 0;
  for (std::int64_t i = full; i < n; ++i) tail += widen(p[i]);
  const auto shift = static_cast<float>((column_sum(sum) + tail) / static_cast<double>(n));
  float s1[kColumns] = {}, s2[kColumns] = {};
  for (std::int64_t i = 0; i < full; i += kColumns) {
    for (std::int64_t j = 0; j < kColumns; ++j) {
      const float d = widen(p[i + j]) - shift;
      s1[j] += d;
      s2[j] += d * d;
    }
  }
  float tail1 = 0, tail2 = 0;
  for (std::int64_t i = full; i < n; ++i) {
    const float d = widen(p[i]) - shift;
    tail1 += d;
    tail2 += d * d;
  }
  return shifted_moments(static_cast<double>(n), shift, column_sum(s1) + tail1, column_sum(s2) + tail2);
}

// Channels-last moments sum down the rows of a chunk, kBlockChannels channels at a time: with a constant width the
// accumulators stay in registers for all the rows (a loop over all C channels per row stores them back each time).
constexpr std::int64_t kBlockChannels = 32;

// For channels c0 .. c0+w-1 (w <= kBlockChannels) over rows r0 .. r1-1 of [S, C] x: sum[c] = sum of x without a
// shift, else s1[c] = sum(x - shift[c]) and s2[c] = sum((x - shift[c])^2).
template <bool kShifted, typename T>
BLITZDIFF_INLINE void block_sums(const T* __restrict__ x, std::int64_t channels, std::int64_t c0, std::int64_t w,
                                 std::int64_t r0, std::int64_t r1, const float* __restrict__ shift,
                                 float* __restrict__ s1, float* __restrict__ s2) {
  float sh[kBlockChannels] = {}, a1[kBlockChannels] = {}, a2[kBlockChannels] = {};
  if constexpr (kShifted) std::copy(shift + c0, shift + c0 + w, sh);
  for (std::int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ row = x + r * channels + c0;
    for (std::int64_t j = 0; j < w; ++j) {
      const float d = widen(row[j]) - sh[j];
      a1[j] += d;
      if constexpr (kShifted) a2[j] += d * d;
    }
  }
  std::copy(a1, a1 + w, s1 + c0);
  if constexpr (kShifted) std::copy(a2, a2 + w, s2 + c0);
}

template <bool kShifted, typename T>
BLITZDIFF_INLINE void all_block_sums(const T* __restrict__ x, std::int64_t channels, std::int64_t r0, std::int64_t r1,
                                     const float* shift, float* s1, float* s2) {
  std::int64_t c0 = 0;
  for (; c0 + kBlockChannels <= channels; c0 += kBlockChannels) {
    block_sums<kShifted>(x, channels, c0, kBlockChannels, r0, r1, shift, s1, s2);  // constant width
  }
  if (c0 < channels) block_sums<kShifted>(x, channels, c0, channels - c0, r0, r1, shift, s1, s2);
}

// Moments of every group over rows r0 .. r1-1 of one channels-last sample [S, C] (a channels-last chunk): per-channel
// sums down the rows, then per group. acc: 3 * C scratch values.
template <typename T>
BLITZDIFF_INLINE void rows_moments(const T* __restrict__ x, std::int64_t channels, std::int64_t groups,
                                   std::int64_t r0, std::int64_t r1, float* __restrict__ acc, Moments* out) {
  float* shift = acc;  // the per-channel sums first, then the shift of the channel's group
  float* s1 = acc + channels;
  float* s2 = acc + 2 * channels;
  const std::int64_t cg = channels / groups;
  const auto n = static_cast<double>((r1 - r0) * cg);
  all_block_sums<false>(x, channels, r0, r1, nullptr, shift, nullptr);
  for (std::int64_t g = 0; g < groups; ++g) {
    double total = 0;
    for (std::int64_t c = g * cg; c < (g + 1) * cg; ++c) total += shift[c];
    std::fill(shift + g * cg, shift + (g + 1) * cg, static_cast<float>(total / n));
  }
  all_block_sums<true>(x, channels, r0, r1, shift, s1, s2);
  for (std::int64_t g = 0; g < groups; ++g) {
    double t1 = 0, t2 = 0;
    for (std::int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      t1 += s1[c];
      t2 += s2[c];
    }
    out[g] = shifted_moments(n, shift[g * cg], t1, t2);
  }
}

// Rows of a channels-last sample per moments chunk: about kRowsChunk values.
std::int64_t rows_per_chunk(const Job& job) { return std::max<std::int64_t>(1, kRowsChunk / job.channels); }

// Moments chunks per (sample, group) (channels-first) or per sample (channels-last, each chunk covering all groups).
std::int64_t chunks(const Job& job) {
  if (job.channels_last) return (job.spatial + rows_per_chunk(job) - 1) / rows_per_chunk(job);
  return (job.channels / job.groups * job.spatial + kChunk - 1) / kChunk;
}

// Work items u0 .. u1-1 of the moments pass. Channels-first: item = (sample * groups + group) * chunks + chunk,
// writing part[item]; channels-last: item = sample * chunks + chunk, writing part[item * groups + group].
template <typename T>
BLITZDIFF_CPU_CLONES void moments_range(const Job& job, std::int64_t u0, std::int64_t u1, Moments* part) {
  const auto* x = static_cast<const T*>(job.x);
  const std::int64_t nch = chunks(job);
  if (!job.channels_last) {
    const std::int64_t group_size = job.channels / job.groups * job.spatial;  // a group is contiguous
    for (std::int64_t u = u0; u < u1; ++u) {
      const std::int64_t begin = u % nch * kChunk;
      part[u] = run_moments(x + u / nch * group_size + begin, std::min(kChunk, group_size - begin));
    }
    return;
  }
  std::vector<float> acc(3 * job.channels);
  const std::int64_t rows = rows_per_chunk(job);
  for (std::int64_t u = u0; u < u1; ++u) {
    const std::int64_t r0 = u % nch * rows, r1 = std::min(job.spatial, r0 + rows);
    rows_moments(x + u / nch * job.spatial * job.channels, job.channels, job.groups, r0, r1, acc.data(),
                 part + u * job.groups);
  }
}

// y = (x - mean) * a + k, SiLU, + residual for one element: the element pass's arithmetic.
template <typename T, bool kSilu, bool kResidual>
BLITZDIFF_INLINE void apply_one(const T* x, const T* res, T* out, float mean, float a, float k) {
  float y = (widen(*x) - mean) * a + k;
  if constexpr (kSilu) y = silu(y);
  if constexpr (kResidual) y += widen(*res);
  narrow(out, y);
}

// Channels-last rows r0 .. r1-1 of one sample, channels c0 .. c0+w-1 (w <= kBlockChannels; kWidth: w as a constant,
// or 0 for the tail block): with a constant width the block's coefficients stay in registers for all its rows and
// the row loop carries no per-row loop setup (a loop over all C channels per row cost ~30 cycles of overhead per
// 32-channel row: 2.5x the time of the same elements in one flat pass).
template <typename T, bool kSilu, bool kResidual, int kWidth>
BLITZDIFF_INLINE void apply_block(const Job& job, std::int64_t sample, std::int64_t c0, std::int64_t w,
                                  std::int64_t r0, std::int64_t r1, const float* coef) {
  const std::int64_t bc = job.batch * job.channels, at = sample * job.channels + c0, width = kWidth ? kWidth : w;
  float m[kBlockChannels], a[kBlockChannels], k[kBlockChannels];
  for (std::int64_t j = 0; j < width; ++j) {
    m[j] = coef[at + j];
    a[j] = coef[bc + at + j];
    k[j] = coef[2 * bc + at + j];
  }
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::int64_t offset = (sample * job.spatial + r) * job.channels + c0;
    const T* __restrict__ x = static_cast<const T*>(job.x) + offset;
    const T* __restrict__ res = static_cast<const T*>(job.residual) + (kResidual ? offset : 0);
    T* __restrict__ out = static_cast<T*>(job.out) + offset;
    for (std::int64_t j = 0; j < width; ++j) apply_one<T, kSilu, kResidual>(x + j, res + j, out + j, m[j], a[j], k[j]);
  }
}

// The element pass over rows q0 .. q1-1, with coef = (mean, a, k) arrays per (sample, channel): a row is one
// (sample, channel) plane of `spatial` values (channels-first: one coefficient per row) or one (sample, position)
// vector of `channels` values (channels-last: the coefficients vary along the row; walked in channel blocks).
template <typename T, bool kSilu, bool kResidual>
BLITZDIFF_CPU_CLONES void apply_range(const Job& job, std::int64_t q0, std::int64_t q1,
                                      const float* coef) {
  if (job.channels_last) {
    for (std::int64_t q = q0; q < q1;) {  // per sample within the range
      const std::int64_t sample = q / job.spatial, r0 = q % job.spatial;
      const std::int64_t r1 = std::min(job.spatial, r0 + (q1 - q));
      std::int64_t c0 = 0;
      for (; c0 + kBlockChannels <= job.channels; c0 += kBlockChannels) {
        apply_block<T, kSilu, kResidual, kBlockChannels>(job, sample, c0, kBlockChannels, r0, r1, coef);
      }
      if (c0 < job.channels) apply_block<T, kSilu, kResidual, 0>(job, sample, c0, job.channels - c0, r0, r1, coef);
      q += r1 - r0;
    }
    return;
  }
  const std::int64_t bc = job.batch * job.channels;
  for (std::int64_t q = q0; q < q1; ++q) {
    const T* __restrict__ x = static_cast<const T*>(job.x) + q * job.spatial;
    const T* __restrict__ res = static_cast<const T*>(job.residual) + (kResidual ? q * job.spatial : 0);
    T* __restrict__ out = static_cast<T*>(job.out) + q * job.spatial;
    const float m = coef[q], aq = coef[bc + q], kq = coef[2 * bc + q];
    for (std::int64_t i = 0; i < job.spatial; ++i) apply_one<T, kSilu, kResidual>(x + i, res + i, out + i, m, aq, kq);
  }
}

enum class DType { kFloat32, kBFloat16 };

DType parse_dtype(const std::string& name, const char* what) {
  if (name == "float32") return DType::kFloat32;
  if (name == "bfloat16") return DType::kBFloat16;
  throw std::invalid_argument(std::string("group_norm_cpu: ") + what + " must be float32 or bfloat16, got '" +
                              name + "'");
}

double load_param(const void* p, std::int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kBFloat16: return widen(static_cast<const BFloat16*>(p)[i]);
  }
  return 0;  // unreachable
}

// Per (sample, channel): the group's mean, a = rstd * weight * (1 + scale), k = bias * (1 + scale) + shift, from the
// chunk moments merged in chunk order (float64, then rounded once to float32).
void coefficients(const Job& job, const Moments* part, DType param, float* coef) {
  const std::int64_t nch = chunks(job), cg = job.channels / job.groups, bc = job.batch * job.channels;
  for (std::int64_t b = 0; b < job.batch; ++b) {
    for (std::int64_t g = 0; g < job.groups; ++g) {
      Moments total;
      for (std::int64_t ch = 0; ch < nch; ++ch) {
        merge(total, job.channels_last ? part[(b * nch + ch) * job.groups + g] : part[(b * job.groups + g) * nch + ch]);
      }
      const double rstd = 1.0 / std::sqrt(total.m2 / total.n + job.eps);
      for (std::int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        const double w = job.weight ? load_param(job.weight, c, param) : 1.0;
        const double bias = job.bias ? load_param(job.bias, c, param) : 0.0;
        const double factor = 1.0 + (job.scale ? load_param(job.scale, b * job.scale_stride + c, param) : 0.0);
        const double shift = job.shift ? load_param(job.shift, b * job.shift_stride + c, param) : 0.0;
        coef[b * job.channels + c] = static_cast<float>(total.mean);
        coef[bc + b * job.channels + c] = static_cast<float>(rstd * w * factor);
        coef[2 * bc + b * job.channels + c] = static_cast<float>(bias * factor + shift);
      }
    }
  }
}

template <typename T, bool kSilu, bool kResidual>
void run(const Job& job, DType param, int threads) {
  const std::int64_t nch = chunks(job);
  const std::int64_t items = job.channels_last ? job.batch * nch : job.batch * job.groups * nch;
  std::vector<Moments> part(job.batch * job.groups * nch);
  parallel_ranges(items, 1, threads,
                  [&](std::int64_t u0, std::int64_t u1) { moments_range<T>(job, u0, u1, part.data()); });
  std::vector<float> coef(3 * job.batch * job.channels);
  coefficients(job, part.data(), param, coef.data());
  const std::int64_t rows = job.channels_last ? job.batch * job.spatial : job.batch * job.channels;
  parallel_ranges(rows, 1, threads, [&](std::int64_t q0, std::int64_t q1) {
    apply_range<T, kSilu, kResidual>(job, q0, q1, coef.data());
  });
}

template <typename T>
void run_typed(const Job& job, bool silu, DType param, int threads) {
  if (silu && job.residual) {
    run<T, true, true>(job, param, threads);
  } else if (silu) {
    run<T, true, false>(job, param, threads);
  } else if (job.residual) {
    run<T, false, true>(job, param, threads);
  } else {
    run<T, false, false>(job, param, threads);
  }
}

}  // namespace

void check_group_norm_args(std::uintptr_t out, std::uintptr_t x, std::int64_t batch, std::int64_t channels,
                           std::int64_t spatial, std::int64_t groups) {
  if (batch < 0 || channels < 0 || spatial < 0) {
    throw std::invalid_argument("group_norm: sizes must be >= 0, got batch " + std::to_string(batch) + ", channels " +
                                std::to_string(channels) + ", spatial " + std::to_string(spatial));
  }
  if (groups < 1 || channels % groups != 0) {
    throw std::invalid_argument("group_norm: groups must be >= 1 and divide channels, got " + std::to_string(groups) +
                                " groups of " + std::to_string(channels) + " channels");
  }
  if (batch * channels * spatial > 0 && (out == 0 || x == 0)) {
    throw std::invalid_argument("group_norm: out and x must be non-null pointers");
  }
}

void group_norm_cpu(std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias,
                    std::uintptr_t scale, std::int64_t scale_stride, std::uintptr_t shift, std::int64_t shift_stride,
                    std::uintptr_t residual, std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                    std::int64_t groups, double eps, bool channels_last, bool silu, const std::string& dtype,
                    const std::string& param_dtype, std::int64_t threads) {
  check_group_norm_args(out, x, batch, channels, spatial, groups);
  const DType data = parse_dtype(dtype, "dtype"), param = parse_dtype(param_dtype, "param_dtype");
  const bool param_ok = param == data || (data == DType::kBFloat16 && param == DType::kFloat32);
  if (!param_ok) {
    throw std::invalid_argument("group_norm_cpu: param_dtype must be the dtype or float32, got '" + param_dtype +
                                "' for '" + dtype + "'");
  }
  const std::int64_t numel = batch * channels * spatial;
  if (numel == 0) return;
  const auto ptr = [](std::uintptr_t p) { return reinterpret_cast<const void*>(p); };
  const Job job{reinterpret_cast<void*>(out), ptr(x), ptr(weight), ptr(bias), ptr(scale), ptr(shift), ptr(residual),
                scale_stride, shift_stride, batch, channels, spatial, groups, eps, channels_last};
  const auto useful = std::max<std::int64_t>(1, numel / kMinElementsPerThread);
  const int n_threads = static_cast<int>(std::clamp<std::int64_t>(std::min(threads, useful), 1, 1024));
  switch (data) {
    case DType::kFloat32: run_typed<float>(job, silu, param, n_threads); break;
    case DType::kBFloat16: run_typed<BFloat16>(job, silu, param, n_threads); break;
  }
}

}  // namespace blitzdiff
