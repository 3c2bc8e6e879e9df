// CPU kernel for the sinusoidal timestep embedding; see timestep_embedding.h for the contract.
// One pass over the [batch, dim] output with the C library's float sin / cos (correctly rounded to within an ulp,
// as PyTorch's own CPU sin / cos); the frequencies come precomputed, so the kernel does no exp. Rows are split over
// up to `threads` threads (parallel.h) once each gets kMinPerThread values; the same bits for any count.
#include <cmath>
#include <stdexcept>

#include "parallel.h"
#include "timestep_embedding.h"

namespace blitzdiff {
namespace {

constexpr std::int64_t kMinPerThread = 1 << 13;  // sin / cos values: ~50 us on one core (as adaln_modulate_cpu)

template <typename TS>
void embed(float* __restrict__ out, const TS* __restrict__ t, std::int64_t t_stride, const float* __restrict__ freqs,
           std::int64_t b_begin, std::int64_t b_end, std::int64_t dim, bool flip, float scale) {
  const std::int64_t half = dim / 2;
  const std::int64_t sin_at = flip ? half : 0, cos_at = flip ? 0 : half;
  for (std::int64_t b = b_begin; b < b_end; ++b) {
    const float tb = static_cast<float>(t[b * t_stride]);  // torch's .float(): round to nearest
    float* row = out + b * dim;
    for (std::int64_t j = 0; j < half; ++j) {
      const float arg = scale * (tb * freqs[j]);  // the spec's order: scale * (t * freq)
      row[sin_at + j] = std::sin(arg);
      row[cos_at + j] = std::cos(arg);
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
  const auto run = [&](const auto* t) {
    parallel_ranges(batch, (kMinPerThread + dim - 1) / std::max<std::int64_t>(dim, 1), threads,
                    [&](std::int64_t first, std::int64_t last) {
                      embed(o, t, t_stride, f, first, last, dim, flip_sin_to_cos, s);
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
