// sin and cos of one argument in double precision as plain arithmetic, no libm call, so that a loop calling it
// vectorizes (libm's scalar sinf / cosf took most of the time of the kernels that call them). Rounded to float32,
// the result is the correctly rounded sin / cos of the float32 argument in all but rare ties: within the kernels'
// few-ulp budget of PyTorch's float32 sin / cos. The same IEEE operations run in every target_clones clone (no
// multiply-add contraction: -ffp-contract=off, CMakeLists.txt), so every CPU gets the same bits.
//
// x = q pi/2 + r with q = round(x / (pi/2)) and |r| <= pi/4; then the Taylor series of cos r and sin r (to r^16 /
// r^17: the next terms are below 1e-16) and q mod 4 picks and signs them. r = (x - q P1) - q P1t (Cody-Waite, fdlibm's
// split of pi/2: P1 its first 33 bits, P1t the rest): for |x| <= kSinCosLimit, q < 2^20, so q P1 and x - q P1 are
// exact and r is off by about 1e-21, which keeps the relative error small even where x nears a multiple of pi/2
// (sin or cos near zero: a float32 x in [pi/4, 2^20] comes no closer than 4.2e-9, at 252.898...). Callers take
// larger arguments to libm.
#pragma once

#include <cstdint>
#include <cstring>

namespace blitzdiff {

constexpr double kSinCosLimit = 1048576.0;  // 2^20

struct SinCos {
  double sin;
  double cos;
};

#if defined(__GNUC__) || defined(__clang__)
__attribute__((always_inline))  // inlined into each caller's clone, compiled for its target
#endif
inline SinCos sin_cos(double x) {
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding and subtracting it rounds to an integer
  const double shifted = x * 0.63661977236758134308 + shifter;
  const double q = shifted - shifter;
  std::uint64_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  const std::uint64_t quadrant = bits & 3u;  // q mod 4: q's two's complement sits in the low mantissa bits
  const double r = (x - q * 1.57079632673412561417) - q * 6.07710050650619224932e-11;
  const double z = r * r;
  const double c = 1.0 + z * (-1.0 / 2 + z * (1.0 / 24 + z * (-1.0 / 720 + z * (1.0 / 40320 + z * (-1.0 / 3628800 +
                   z * (1.0 / 479001600 + z * (-1.0 / 87178291200 + z / 20922789888000.0)))))));
  const double s = r * (1.0 + z * (-1.0 / 6 + z * (1.0 / 120 + z * (-1.0 / 5040 + z * (1.0 / 362880 +
                   z * (-1.0 / 39916800 + z * (1.0 / 6227020800 + z * (-1.0 / 1307674368000.0 +
                   z / 355687428096000.0))))))));
  // quadrant 0: (s, c); 1: (c, -s); 2: (-s, -c); 3: (-c, s)
  const bool odd = (quadrant & 1u) != 0;
  const double sin_r = odd ? c : s, cos_r = odd ? s : c;
  const bool sin_negative = (quadrant & 2u) != 0, cos_negative = ((quadrant + 1u) & 2u) != 0;
  return {sin_negative ? -sin_r : sin_r, cos_negative ? -cos_r : cos_r};
}

}  // namespace blitzdiff
