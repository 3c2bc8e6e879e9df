// CPU kernel for the per-sample Gaussian noise; see gaussian_noise.h for the contract and the formula.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "gaussian_noise.h"
#include "parallel.h"
#include "sincos.h"
#include "vectorize.h"

namespace blitzdiff {
namespace {

// The hash vectorizes 4 lanes wide on baseline x86-64 (SSE2, which lacks a 32-bit multiply), 8 wide with AVX2 and 16
// with AVX-512 (Box-Muller's double-precision math 2, 4 and 8 wide): one clone per width (vectorize.h), with the same
// integer and IEEE operations, so identical results. The AVX-512 clone took an 8x4x64x64 draw from 443 to 314 us at
// 2 threads (721 to 561 us at 1) with the same bits for 24 shapes, dtypes and streams (sha256 of the outputs before
// and after).

// Elements per block: two float32 uniform buffers of this size stay in L1 between the hash and Box-Muller passes.
constexpr std::int64_t kBlock = 512;
// Past this counter the spec's int64 emulation itself overflows (its products reach 2^63), so no exact twin exists.
constexpr std::int64_t kMaxCounter = std::int64_t{1} << 47;

// log and cos without libm calls (cos: sincos.h), so that the Box-Muller loop vectorizes like the hash (libm's scalar
// logf / cosf were 80% of the kernel's time). Both evaluate in double precision, which makes the float32 result the
// correctly rounded one in all but rare ties: within the spec's few-ulp budget of PyTorch's float32 log / cos. The
// same IEEE operations run in every clone (no FMA contraction), so every CPU gets the same bits.

// log(u) for u = (k + 0.5) * 2^-24, k < 2^24 (the uniforms: normal floats in (0, 1)). u = m * 2^e with m in
// [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(f), f = (m - 1) / (m + 1), |f| <= 0.1716, by its series to f^15 (the next
// term is below 1e-14 of the result).
BLITZDIFF_INLINE double log_unit(float u) {
  std::uint32_t bits;
  std::memcpy(&bits, &u, sizeof bits);
  const bool high = (bits & 0x7FFFFFu) > 0x3504F3u;  // mantissa above sqrt(2): use m / 2 and e + 1
  const std::uint32_t mantissa_bits = (bits & 0x7FFFFFu) | (high ? 0x3F000000u : 0x3F800000u);
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof m);
  const double e = static_cast<double>(static_cast<std::int32_t>(bits >> 23) - (high ? 126 : 127));
  const double f = (static_cast<double>(m) - 1.0) / (static_cast<double>(m) + 1.0);
  const double z = f * f;
  const double series =
      1.0 + z * (1.0 / 3 + z * (1.0 / 5 + z * (1.0 / 7 + z * (1.0 / 9 + z * (1.0 / 11 + z * (1.0 / 13 + z / 15))))));
  return 2.0 * f * series + e * 0.69314718055994530942;
}

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

// Blocks first .. last - 1 of the output, block k being elements (k % blocks) * kBlock ... of row k / blocks: a
// vectorized hash pass fills the radius and angle uniforms, then Box-Muller (log_unit, sin_cos), rounded once to T.
// Each element depends only on its row's seed and its index, so any split of the blocks gives the same bits.
template <typename T>
BLITZDIFF_CPU_CLONES void fill(T* __restrict__ out, const std::int64_t* seeds, std::int64_t count,
                               std::uint32_t stream, std::int64_t first, std::int64_t last) {
  alignas(64) float radius_u[kBlock];
  alignas(64) float angle_u[kBlock];
  const std::int64_t blocks = (count + kBlock - 1) / kBlock;
  for (std::int64_t block = first; block < last;) {
    const std::int64_t b = block / blocks;
    const NoiseKeys keys = noise_keys(seeds[b], stream);
    T* row = out + b * count;
    for (; block < last && block / blocks == b; ++block) {
      const std::int64_t k0 = (block % blocks) * kBlock;
      const std::int64_t n = std::min(kBlock, count - k0);
      hash_block(keys, static_cast<std::uint64_t>(k0), n, radius_u, bits_to_uniform);         // counters k
      hash_block(keys, static_cast<std::uint64_t>(count + k0), n, angle_u, bits_to_uniform);  // count + k
      for (std::int64_t j = 0; j < n; ++j) {
        const double radius = std::sqrt(-2.0 * log_unit(radius_u[j]));
        row[k0 + j] = static_cast<T>(static_cast<float>(radius * sin_cos(kTwoPi * angle_u[j]).cos));
      }
    }
  }
}

// fill over every block, split over up to `threads` threads (parallel.h), each range at least kBlocksPerThread
// blocks.
constexpr std::int64_t kBlocksPerThread = 2;  // 1024 normals, ~4 us on one core. Xeon, right after a matmul
                                               // (benchmarks/cpu_kernel_threads.py): 3072 normals 11.7 us on 2
                                               // threads vs 17.0 on 1, 16384: 39.9 vs 72.6; back to back, 2048:
                                               // 5.4 vs 8.3 us.

template <typename T>
void fill_parallel(T* out, const std::int64_t* seeds, std::int64_t batch, std::int64_t count, std::uint32_t stream,
                   std::int64_t threads) {
  const std::int64_t total = batch * ((count + kBlock - 1) / kBlock);
  parallel_ranges(total, kBlocksPerThread, threads, [&](std::int64_t first, std::int64_t last) {
    fill<T>(out, seeds, count, stream, first, last);
  });
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
                        std::int64_t stream, const std::string& dtype, std::int64_t threads) {
  check_gaussian_noise_args(out, seeds, batch, count, stream);
  check_threads("gaussian_noise_cpu", threads);
  const auto* s = reinterpret_cast<const std::int64_t*>(seeds);
  const auto st = static_cast<std::uint32_t>(stream);
  if (dtype == "float32") {
    fill_parallel(reinterpret_cast<float*>(out), s, batch, count, st, threads);
  } else if (dtype == "float64") {
    fill_parallel(reinterpret_cast<double*>(out), s, batch, count, st, threads);
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
