// CPU kernel for the sinusoidal timestep embedding; see timestep_embedding.h for the contract.
// One pass over the [batch, dim] output; the frequencies come precomputed, so the kernel does no exp. sin and cos of
// each float32 argument come from one double-precision evaluation (sincos.h: the correctly rounded float32 value in
// all but rare ties, within an ulp of PyTorch's own CPU sin / cos), which vectorizes; a row whose arguments may pass
// kSinCosLimit (|scale * t| * the largest frequency; NaN / Inf too) takes the C library's sin / cos instead. Rows are
// split over up to `threads` threads (parallel.h) once each gets kMinPerThread values; the same bits for any count.
#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "parallel.h"
#include "sincos.h"
#include "timestep_embedding.h"
#include "vectorize.h"

namespace blitzdiff {
namespace {

constexpr std::int64_t kMinPerThread = 1 << 13;  // sin / cos values: ~7 us on one core (Xeon, AVX-512)

// The row loop is compiled once per x86 vector width (vectorize.h), with the same bits in each.
template <typename TS>
BLITZDIFF_CPU_CLONES void embed(float* __restrict__ out, const TS* __restrict__ t, std::int64_t t_stride,
                                const float* __restrict__ freqs, float max_freq, std::int64_t b_begin,
                                std::int64_t b_end, std::int64_t dim, bool flip, float scale) {
  const std::int64_t half = dim / 2;
  const std::int64_t sin_at = flip ? half : 0, cos_at = flip ? 0 : half;
  for (std::int64_t b = b_begin; b < b_end; ++b) {
    const float tb = static_cast<float>(t[b * t_stride]);  // torch's .float(): round to nearest
    float* row = out + b * dim;
    float* __restrict__ sin_out = row + sin_at;
    float* __restrict__ cos_out = row + cos_at;
    // |scale * (tb * f)| <= |scale| |tb| max_freq, up to two float roundings: half the limit leaves room for them
    if (std::fabs(scale) * std::fabs(tb) * max_freq <= 0.5 * kSinCosLimit) {
      for (std::int64_t j = 0; j < half; ++j) {
        const SinCos v = sin_cos(scale * (tb * freqs[j]));  // the spec's float32 argument: scale * (t * freq)
        sin_out[j] = static_cast<float>(v.sin);
        cos_out[j] = static_cast<float>(v.cos);
      }
    } else {
      for (std::int64_t j = 0; j < half; ++j) {
        const float arg = scale * (tb * freqs[j]);
        sin_out[j] = std::sin(arg);
        cos_out[j] = std::cos(arg);
      }
    }
    if (dim % 2 == 1) row[dim - 1] = 0.0f;
  }
}

}  // namespace

void check_timestep_embedding_args(std::uintptr_t out, std::uintptr_t timesteps, std::uintptr_t freqs,
                                   std::int64_t t_stride, std::int64_t batch, std::int64_t dim) {
  if (batch < 0 || dim < 0 || t_stride < 0) {
    throw std::invalid_argument("timestep_embedding: need batch, dim and t_stride >= 0, got batch=" +
                                std::to_string(batch) + ", dim=" + std::to_string(dim) + ", t_stride=" +
                                std::to_string(t_stride));
  }
  if (batch > 0 && dim > 0 && (out == 0 || timesteps == 0 || (dim >= 2 && freqs == 0))) {
    throw std::invalid_argument("timestep_embedding: out, timesteps and freqs must be non-null pointers");
  }
}

void timestep_embedding_cpu(std::uintptr_t out, std::uintptr_t timesteps, std::int64_t t_stride,
                            const std::string& t_dtype, std::uintptr_t freqs, std::int64_t batch, std::int64_t dim,
                            bool flip_sin_to_cos, double scale, std::int64_t threads) {
  check_timestep_embedding_args(out, timesteps, freqs, t_stride, batch, dim);
  check_threads("timestep_embedding_cpu", threads);
  auto* o = reinterpret_cast<float*>(out);
  const auto* f = reinterpret_cast<const float*>(freqs);
  const auto s = static_cast<float>(scale);
  float max_freq = 0.0f;  // NaN frequencies make every row take libm
  for (std::int64_t j = 0; j < dim / 2; ++j) max_freq = std::isnan(f[j]) ? NAN : std::max(max_freq, std::fabs(f[j]));
  const auto run = [&](const auto* t) {
    parallel_ranges(batch, (kMinPerThread + dim - 1) / std::max<std::int64_t>(dim, 1), threads,
                    [&](std::int64_t first, std::int64_t last) {
                      embed(o, t, t_stride, f, max_freq, first, last, dim, flip_sin_to_cos, s);
                    });
  };
  if (t_dtype == "int64") {
    run(reinterpret_cast<const std::int64_t*>(timesteps));
  } else if (t_dtype == "int32") {
    run(reinterpret_cast<const std::int32_t*>(timesteps));
  } else if (t_dtype == "float32") {
    run(reinterpret_cast<const float*>(timesteps));
  } else if (t_dtype == "float64") {
    run(reinterpret_cast<const double*>(timesteps));
  } else {
    throw std::invalid_argument("timestep_embedding_cpu: timesteps must be int64, int32, float32 or float64, got '" +
                                t_dtype + "'");
  }
}

}  // namespace blitzdiff
