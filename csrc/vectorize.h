// What the CPU kernels share so that GCC / Clang vectorize their loops:
//
// - BLITZDIFF_CPU_CLONES on a loop function: on Linux x86-64 it is compiled for AVX-512, AVX2 and baseline x86-64
//   (SSE2), and the loader picks the clone for the CPU once (GNU ifunc); the build itself targets baseline x86-64 so
//   that the module runs on any CPU. The clones run the same IEEE operations (no multiply-add contracted into an
//   FMA: -ffp-contract=off, CMakeLists.txt), so every CPU gets the same bits.
// - BLITZDIFF_INLINE on the helpers such a loop calls: forced inline, so they are compiled for the clone's target.
// - BLITZDIFF_CPU_CLONES_FMA: the same for a loop that rounds its multiply-adds once (multiply_add<true>, std::fma):
//   clones for the x86-64 levels that have FMA (v4: AVX-512, v3: AVX2 + FMA), so that each one is an instruction;
//   the baseline clone computes it in software (libm's fmaf: the same bits, ~40x slower; only x86-64 CPUs without
//   FMA, before 2013, run it).
// - exp_approx: exp without libm (whose expf does not vectorize).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define BLITZDIFF_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define BLITZDIFF_CPU_CLONES_FMA __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define BLITZDIFF_INLINE __attribute__((always_inline)) inline
#else
#define BLITZDIFF_CPU_CLONES
#define BLITZDIFF_CPU_CLONES_FMA
#define BLITZDIFF_INLINE inline
#endif

namespace blitzdiff {

constexpr std::uint32_t kBits87 = 0x42AE0000u;  // the IEEE bits of 87.0f
constexpr std::uint32_t kBits89 = 0x42B20000u;  // and of 89.0f

// Whether this CPU runs AVX-512 (F) code: the dispatch of the hand-vectorized loops (tile_kernel.h and its users,
// adaLN modulation's statistics).
inline bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// a * b + c, rounded once (std::fma) where Fused, else twice (-ffp-contract=off keeps the two apart).
template <bool Fused>
BLITZDIFF_INLINE float multiply_add(float a, float b, float c) {
  if constexpr (Fused) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// exp(x) in float32 to ~1 ulp with only +, *, and integer bit operations, so it vectorizes: Cephes' expf,
// x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r), 2^n from the exponent bits. x is first
// clamped to [-87, 89] on its bit pattern (integer compares: a float compare may trap under -ftrapping-math, GCC's
// default, which keeps GCC from vectorizing the select): 2^n stays a normal float below, and becomes +inf (n = 128)
// above ~88.4, where expf overflows too. NaN yields a finite value; callers keep NaN through their other operand.
// Fused: each multiply-add of the reduction and the polynomial rounded once (9 instructions fewer per vector where
// they are FMAs; BLITZDIFF_CPU_CLONES_FMA), other bits than the unfused form.
template <bool Fused = false>
BLITZDIFF_INLINE float exp_approx(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const std::uint32_t negative = bits >> 31;
  const std::uint32_t limit = negative ? kBits87 : kBits89;
  bits = (negative << 31) | std::min(bits & 0x7FFFFFFFu, limit);
  std::memcpy(&x, &bits, sizeof x);
  // round to nearest: the 1.5 * 2^23 trick
  const float n = multiply_add<Fused>(x, 1.44269504088896341f, 12582912.0f) - 12582912.0f;
  // Cody-Waite, ln2 = C1 - C2: (x - n C1) + n C2
  const float r = multiply_add<Fused>(n, 2.12194440e-4f, multiply_add<Fused>(n, -0.693359375f, x));
  float p = 1.9875691500e-4f;
  p = multiply_add<Fused>(p, r, 1.3981999507e-3f);
  p = multiply_add<Fused>(p, r, 8.3334519073e-3f);
  p = multiply_add<Fused>(p, r, 4.1665795894e-2f);
  p = multiply_add<Fused>(p, r, 1.6666665459e-1f);
  p = multiply_add<Fused>(p, r, 5.0000001201e-1f);
  p = multiply_add<Fused>(p, r * r, r) + 1.0f;
  const std::uint32_t scale_bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

}  // namespace blitzdiff
