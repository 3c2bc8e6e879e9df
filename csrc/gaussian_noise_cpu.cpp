// CPU kernel for the per-sample Gaussian noise; see gaussian_noise.h for the contract and the formula.
#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "gaussian_noise.h"

namespace blitzdiff {
namespace {

// The hash vectorizes 4 lanes wide on baseline x86-64 (SSE2, which lacks a 32-bit multiply) and 8 wide with AVX2,
// about 4x faster: on Linux x86-64 the row loops are compiled twice and the loader picks the clone for the CPU
// (GNU ifunc). The clones run the same integer and IEEE float32 operations (AVX2 brings no FMA), so identical
// results; log and cos are glibc's either way.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define BLITZDIFF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define BLITZDIFF_INLINE __attribute__((always_inline)) inline  // compiled into each clone, for its target
#else
#define BLITZDIFF_CPU_CLONES
#define BLITZDIFF_INLINE inline
#endif

// Elements per block: two float32 uniform buffers of this size stay in L1 between the hash and Box-Muller passes.
constexpr std::int64_t kBlock = 512;
// Past this counter the spec's int64 emulation itself overflows (its products reach 2^63), so no exact twin exists.
constexpr std::int64_t kMaxCounter = std::int64_t{1} << 47;

// out[j] = convert(bits(first + j)) for j < n <= kBlock. When the block does not cross a multiple of 2^32 (always,
// unless a sample has over 2^31 elements) the counter's high bits are loop-invariant and the loop is pure uint32
// arithmetic, which GCC/Clang vectorize at -O3. noise_bits_cpu runs this same code, so the tests see it exactly.
template <typename Out, typename Convert>
BLITZDIFF_INLINE void hash_block(NoiseKeys keys, std::uint64_t first, std::int64_t n, Out* __restrict__ out,
                                 Convert convert) {
  if ((first >> 32) == ((first + n - 1) >> 32)) {
    const auto high = static_cast<std::uint32_t>(first >> 32) << 16;
    const auto low = static_cast<std::uint32_t>(first);
    const auto m = static_cast<std::uint32_t>(n);
    for (std::uint32_t j = 0; j < m; ++j) {
      out[j] = convert(mix32(mix32((low + j) ^ keys.key1, high) ^ keys.key2));
    }
  } else {
    for (std::int64_t j = 0; j < n; ++j) out[j] = convert(noise_bits(keys, first + j));
  }
}

// One sample row at a time (its keys computed once), in blocks: a vectorized hash pass fills the radius and angle
// uniforms, then Box-Muller in float32 with <cmath>'s logf / cosf / sqrtf, rounded once to T.
template <typename T>
BLITZDIFF_CPU_CLONES void fill(T* __restrict__ out, const std::int64_t* seeds, std::int64_t batch,
                               std::int64_t count, std::uint32_t stream) {
  alignas(64) float radius_u[kBlock];
  alignas(64) float angle_u[kBlock];
  for (std::int64_t b = 0; b < batch; ++b) {
    const NoiseKeys keys = noise_keys(seeds[b], stream);
    T* row = out + b * count;
    for (std::int64_t k0 = 0; k0 < count; k0 += kBlock) {
      const std::int64_t n = std::min(kBlock, count - k0);
      hash_block(keys, static_cast<std::uint64_t>(k0), n, radius_u, bits_to_uniform);         // counters k
      hash_block(keys, static_cast<std::uint64_t>(count + k0), n, angle_u, bits_to_uniform);  // count + k
      for (std::int64_t j = 0; j < n; ++j) {
        const float radius = std::sqrt(-2.0f * std::log(radius_u[j]));
        row[k0 + j] = static_cast<T>(radius * std::cos(kTwoPi * angle_u[j]));
      }
    }
  }
}

// The raw hash, through the same hash_block as fill (so the tests of noise_bits_cpu cover fill's integer part).
BLITZDIFF_CPU_CLONES void fill_bits(std::int64_t* __restrict__ out, const std::int64_t* seeds, std::int64_t batch,
                                    std::uint32_t stream, std::uint64_t first, std::int64_t n) {
  const auto widen = [](std::uint32_t bits) { return static_cast<std::int64_t>(bits); };
  for (std::int64_t b = 0; b < batch; ++b) {
    const NoiseKeys keys = noise_keys(seeds[b], stream);
    for (std::int64_t j0 = 0; j0 < n; j0 += kBlock) {
      hash_block(keys, first + j0, std::min(kBlock, n - j0), out + b * n + j0, widen);
    }
  }
}

}  // namespace

void check_gaussian_noise_args(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t count,
                               std::int64_t stream) {
  if (batch < 0 || count < 0) {
    throw std::invalid_argument("gaussian_noise: batch and count must be >= 0, got " + std::to_string(batch) +
                                " and " + std::to_string(count));
  }
  if (count > kMaxCounter / 2) {
    throw std::invalid_argument("gaussian_noise: count must be <= 2^46, got " + std::to_string(count));
  }
  if (stream < 0 || stream >= (std::int64_t{1} << 31)) {
    throw std::invalid_argument("gaussian_noise: stream must be in [0, 2^31), got " + std::to_string(stream));
  }
  if (batch > 0 && count > 0 && (out == 0 || seeds == 0)) {
    throw std::invalid_argument("gaussian_noise: out and seeds must be non-null pointers");
  }
}

void check_noise_bits_args(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t stream,
                           std::int64_t first, std::int64_t n) {
  check_gaussian_noise_args(out, seeds, batch, n, stream);
  if (first < 0 || first > kMaxCounter - n) {
    throw std::invalid_argument("noise_bits: need 0 <= first and first + n <= 2^47, got first=" +
                                std::to_string(first) + ", n=" + std::to_string(n));
  }
}

void gaussian_noise_cpu(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t count,
                        std::int64_t stream, const std::string& dtype) {
  check_gaussian_noise_args(out, seeds, batch, count, stream);
  const auto* s = reinterpret_cast<const std::int64_t*>(seeds);
  const auto st = static_cast<std::uint32_t>(stream);
  if (dtype == "float32") {
    fill(reinterpret_cast<float*>(out), s, batch, count, st);
  } else if (dtype == "float64") {
    fill(reinterpret_cast<double*>(out), s, batch, count, st);
  } else {
    throw std::invalid_argument("gaussian_noise_cpu: dtype must be float32 or float64, got '" + dtype + "'");
  }
}

void noise_bits_cpu(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t stream,
                    std::int64_t first, std::int64_t n) {
  check_noise_bits_args(out, seeds, batch, stream, first, n);
  fill_bits(reinterpret_cast<std::int64_t*>(out), reinterpret_cast<const std::int64_t*>(seeds), batch,
            static_cast<std::uint32_t>(stream), static_cast<std::uint64_t>(first), n);
}

}  // namespace blitzdiff
