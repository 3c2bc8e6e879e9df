// CPU kernels for adaLN modulation and the gated residual; see adaln_modulate.h for the contract.
//
// One row (token) at a time (on AVX-512, float32: the statistics of four rows side by side, the same bits): the row
// (D <= a few thousand) stays in L1 across the two statistics passes and the output pass, so x is read from memory
// once. Sums run in float64 over 8 independent lanes (a fixed lane split that the compiler vectorizes without
// reassociating, so results are the same on every run). Rows are split over up to `threads` threads (parallel.h) in
// calls of at least kMinPerThread elements per thread; each row is computed the same way on any thread, so every
// thread count gives the same bits.
#include <cmath>
#include <stdexcept>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "adaln_modulate.h"
#include "parallel.h"
#include "vectorize.h"

namespace blitzdiff {
namespace {

constexpr int kLanes = 8;
// Elements per thread before a call is split: 2^16 was sized for std::thread starts; with OpenMP's workers (awake
// after torch's own ops) 2^15 splits dit-digits' guided batch-8 calls (16x64x96 = 98304 elements) over 2 threads
// (README "Benchmarks", --kernels).
constexpr std::int64_t kMinPerThread = 1 << 15;

// sum_i (x[i] - center)^power for power 1 or 2, in float64.
template <int kPower, typename T>
BLITZDIFF_INLINE double row_moment(const T* __restrict__ x, std::int64_t dim, double center) {
  double lane[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = static_cast<double>(x[i + l]) - center;
      lane[l] += kPower == 1 ? v : v * v;
    }
  }
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  for (; i < dim; ++i) {
    const double v = static_cast<double>(x[i]) - center;
    sum += kPower == 1 ? v : v * v;
  }
  return sum;
}

// One output row: (x - m) * rstd * (1 + scale) + shift, rounded per operation in that order.
template <typename T>
BLITZDIFF_INLINE void modulate_row(T* __restrict__ o, const T* __restrict__ xr, T m, T rstd, const T* __restrict__ sh,
                                   const T* __restrict__ sc, std::int64_t dim) {
  for (std::int64_t i = 0; i < dim; ++i) o[i] = (xr[i] - m) * rstd * (T(1) + sc[i]) + sh[i];
}

template <typename T>
BLITZDIFF_INLINE void modulate(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ shift,
                               const T* __restrict__ scale, std::int64_t r_begin, std::int64_t r_end,
                               std::int64_t tokens, std::int64_t dim, std::int64_t param_stride, double eps) {
  for (std::int64_t r = r_begin; r < r_end; ++r) {
    const T* xr = x + r * dim;
    const double mean = row_moment<1>(xr, dim, 0.0) / static_cast<double>(dim);
    const double var = row_moment<2>(xr, dim, mean) / static_cast<double>(dim);
    const std::int64_t b = r / tokens;
    modulate_row(out + r * dim, xr, static_cast<T>(mean), static_cast<T>(1.0 / std::sqrt(var + eps)),
                 shift + b * param_stride, scale + b * param_stride, dim);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BLITZDIFF_MODULATE_AVX512 1
// row_moment of kRowGroup consecutive float32 rows side by side on AVX-512: each row's 8 float64 lanes are one zmm
// summed in its own chain and then in lane order, as row_moment sums them (the same bits); a DiT row of 96 values is
// 12 dependent additions per pass, whose latencies the group's rows overlap (dit-digits' 16x64x96 on one core of an
// AMD EPYC: 47 -> 36 us a call).
constexpr int kRowGroup = 4;

template <int kPower>
__attribute__((target("avx512f"))) inline void group_moments(const float* x, std::int64_t dim, const double* center,
                                                             double* sums) {
  __m512d lane[kRowGroup];
  for (int r = 0; r < kRowGroup; ++r) lane[r] = _mm512_setzero_pd();
  std::int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    for (int r = 0; r < kRowGroup; ++r) {
      const __m512d v = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + r * dim + i)), _mm512_set1_pd(center[r]));
      lane[r] = _mm512_add_pd(lane[r], kPower == 1 ? v : _mm512_mul_pd(v, v));
    }
  }
  alignas(64) double values[kRowGroup][kLanes];
  for (int r = 0; r < kRowGroup; ++r) {
    _mm512_store_pd(values[r], lane[r]);
    sums[r] = 0.0;
  }
  for (int l = 0; l < kLanes; ++l) {  // lane order, the rows' chains side by side
    for (int r = 0; r < kRowGroup; ++r) sums[r] += values[r][l];
  }
  for (std::int64_t j = i; j < dim; ++j) {
    for (int r = 0; r < kRowGroup; ++r) {
      const double v = static_cast<double>(x[r * dim + j]) - center[r];
      sums[r] += kPower == 1 ? v : v * v;
    }
  }
}

// modulate<float> with the statistics of kRowGroup rows at a time (group_moments), the rest as modulate does.
__attribute__((target("avx512f"))) void modulate_f32_avx512(float* out, const float* x, const float* shift,
                                                            const float* scale, std::int64_t r_begin,
                                                            std::int64_t r_end, std::int64_t tokens, std::int64_t dim,
                                                            std::int64_t param_stride, double eps) {
  std::int64_t r = r_begin;
  for (; r + kRowGroup <= r_end; r += kRowGroup) {
    const double zero[kRowGroup] = {};
    double mean[kRowGroup], var[kRowGroup];
    group_moments<1>(x + r * dim, dim, zero, mean);
    for (double& m : mean) m /= static_cast<double>(dim);
    group_moments<2>(x + r * dim, dim, mean, var);
    for (int g = 0; g < kRowGroup; ++g) {
      const std::int64_t b = (r + g) / tokens;
      modulate_row(out + (r + g) * dim, x + (r + g) * dim, static_cast<float>(mean[g]),
                   static_cast<float>(1.0 / std::sqrt(var[g] / static_cast<double>(dim) + eps)),
                   shift + b * param_stride, scale + b * param_stride, dim);
    }
  }
  modulate(out, x, shift, scale, r, r_end, tokens, dim, param_stride, eps);
}
#endif

template <typename T>
BLITZDIFF_INLINE void gated(T* __restrict__ out, const T* __restrict__ residual, const T* __restrict__ y,
                            const T* __restrict__ gate, std::int64_t r_begin, std::int64_t r_end,
                            std::int64_t tokens, std::int64_t dim, std::int64_t param_stride) {
  for (std::int64_t r = r_begin; r < r_end; ++r) {
    const T* g = gate + (r / tokens) * param_stride;
    const T* res = residual + r * dim;
    const T* yr = y + r * dim;
    T* o = out + r * dim;
    for (std::int64_t i = 0; i < dim; ++i) o[i] = res[i] + g[i] * yr[i];
  }
}

template <typename T>
BLITZDIFF_CPU_CLONES void modulate_clones(T* out, const T* x, const T* shift, const T* scale, std::int64_t r_begin,
                                          std::int64_t r_end, std::int64_t tokens, std::int64_t dim,
                                          std::int64_t param_stride, double eps) {
  modulate(out, x, shift, scale, r_begin, r_end, tokens, dim, param_stride, eps);
}

template <typename T>
BLITZDIFF_CPU_CLONES void gated_clones(T* out, const T* residual, const T* y, const T* gate, std::int64_t r_begin,
                                       std::int64_t r_end, std::int64_t tokens, std::int64_t dim,
                                       std::int64_t param_stride) {
  gated(out, residual, y, gate, r_begin, r_end, tokens, dim, param_stride);
}

// body(first_row, last_row) over [0, rows) on up to `threads` threads, at least kMinPerThread elements each.
template <typename Body>
void over_rows(std::int64_t rows, std::int64_t dim, std::int64_t threads, const Body& body) {
  parallel_ranges(rows, (kMinPerThread + dim - 1) / dim, threads, body);
}

template <typename T>
const T* in(std::uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

}  // namespace

void check_adaln_args(const char* op, std::uintptr_t out, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c,
                      std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride) {
  const std::string name(op);
  if (rows < 0 || tokens < 1 || dim < 1 || param_stride < 0) {
    throw std::invalid_argument(name + ": need rows >= 0, tokens >= 1, dim >= 1 and param_stride >= 0, got rows=" +
                                std::to_string(rows) + ", tokens=" + std::to_string(tokens) + ", dim=" +
                                std::to_string(dim) + ", param_stride=" + std::to_string(param_stride));
  }
  if (rows > 0 && (out == 0 || a == 0 || b == 0 || c == 0)) {
    throw std::invalid_argument(name + ": every pointer must be non-null");
  }
}

void adaln_modulate_cpu(std::uintptr_t out, std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                        std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride,
                        double eps, const std::string& dtype, std::int64_t threads) {
  check_adaln_args("adaln_modulate", out, x, shift, scale, rows, tokens, dim, param_stride);
  check_threads("adaln_modulate_cpu", threads);
  if (dtype == "float32") {
    over_rows(rows, dim, threads, [&](std::int64_t first, std::int64_t last) {
#ifdef BLITZDIFF_MODULATE_AVX512
      if (cpu_has_avx512()) {
        modulate_f32_avx512(reinterpret_cast<float*>(out), in<float>(x), in<float>(shift), in<float>(scale), first,
                            last, tokens, dim, param_stride, eps);
        return;
      }
#endif
      modulate_clones<float>(reinterpret_cast<float*>(out), in<float>(x), in<float>(shift), in<float>(scale), first,
                             last, tokens, dim, param_stride, eps);
    });
  } else if (dtype == "float64") {
    over_rows(rows, dim, threads, [&](std::int64_t first, std::int64_t last) {
      modulate_clones<double>(reinterpret_cast<double*>(out), in<double>(x), in<double>(shift), in<double>(scale),
                              first, last, tokens, dim, param_stride, eps);
    });
  } else {
    throw std::invalid_argument("adaln_modulate_cpu: dtype must be float32 or float64, got '" + dtype + "'");
  }
}

void adaln_gated_residual_cpu(std::uintptr_t out, std::uintptr_t residual, std::uintptr_t y, std::uintptr_t gate,
                              std::int64_t rows, std::int64_t tokens, std::int64_t dim, std::int64_t param_stride,
                              const std::string& dtype, std::int64_t threads) {
  check_adaln_args("adaln_gated_residual", out, residual, y, gate, rows, tokens, dim, param_stride);
  check_threads("adaln_gated_residual_cpu", threads);
  if (dtype == "float32") {
    over_rows(rows, dim, threads, [&](std::int64_t first, std::int64_t last) {
      gated_clones<float>(reinterpret_cast<float*>(out), in<float>(residual), in<float>(y), in<float>(gate), first,
                          last, tokens, dim, param_stride);
    });
  } else if (dtype == "float64") {
    over_rows(rows, dim, threads, [&](std::int64_t first, std::int64_t last) {
      gated_clones<double>(reinterpret_cast<double*>(out), in<double>(residual), in<double>(y), in<double>(gate),
                           first, last, tokens, dim, param_stride);
    });
  } else {
    throw std::invalid_argument("adaln_gated_residual_cpu: dtype must be float32 or float64, got '" + dtype + "'");
  }
}

}  // namespace blitzdiff
