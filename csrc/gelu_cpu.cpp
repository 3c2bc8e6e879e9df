// CPU kernel for the tanh-approximate GELU; see gelu.h for the contract.
//
// PyTorch's own CPU tanh GELU runs several times slower than its erf GELU (float32, [16, 64, 384]: 308 us against
// 64 us on 2 threads of a Sapphire Rapids Xeon, torch 2.13), and a DiT's MLP runs one per block. Here the float32
// loop is plain arithmetic that GCC vectorizes, its multiply-adds rounded once (vectorize.h: exp_approx<true>,
// BLITZDIFF_CPU_CLONES_FMA: FMA instructions on x86-64-v3 and v4, the same bits on every CPU): 196608 values on one
// core of an AMD EPYC (Zen 4) 113 -> 81 us against the unfused form, the kernel file alone in a harness.
#include <cmath>
#include <stdexcept>

#include "gelu.h"
#include "parallel.h"
#include "vectorize.h"

namespace blitzdiff {
namespace {

// Elements per thread before a call is split: ~5 us of work on one core (Xeon, AVX-512), about what waking a worker
// costs; a DiT-digits MLP at batch 1 (49152 values) then runs on 2 threads.
constexpr std::int64_t kMinPerThread = 1 << 13;
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCubic = 0.044715;

// x / (1 + exp(-2z)), z = c (x + 0.044715 x^3): exp_approx overflows to +inf past -2z ~ 88.4 (x / inf = x * 0) and
// keeps NaN through x.
BLITZDIFF_INLINE float gelu_f32(float x) {
  constexpr auto kMinus2C = static_cast<float>(-2.0 * kSqrt2OverPi);
  return x / (1.0f + exp_approx<true>(kMinus2C * multiply_add<true>(static_cast<float>(kCubic) * x, x * x, x)));
}

BLITZDIFF_CPU_CLONES_FMA void gelu_f32_range(float* __restrict__ out, const float* __restrict__ x,
                                             std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; ++i) out[i] = gelu_f32(x[i]);
}

// In place (out == x): the same loop without the no-alias promise.
BLITZDIFF_CPU_CLONES_FMA void gelu_f32_inplace(float* x, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; ++i) x[i] = gelu_f32(x[i]);
}

void gelu_f64_range(double* out, const double* x, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; ++i) {
    const double v = x[i];
    out[i] = v / (1.0 + std::exp(-2.0 * kSqrt2OverPi * (v + kCubic * v * v * v)));  // exp overflows to inf as above
  }
}

}  // namespace

void check_gelu_args(std::uintptr_t out, std::uintptr_t x, std::int64_t n) {
  if (n < 0) throw std::invalid_argument("gelu_tanh: need n >= 0, got " + std::to_string(n));
  if (n > 0 && (out == 0 || x == 0)) throw std::invalid_argument("gelu_tanh: every pointer must be non-null");
}

void gelu_tanh_cpu(std::uintptr_t out, std::uintptr_t x, std::int64_t n, const std::string& dtype,
                   std::int64_t threads) {
  check_gelu_args(out, x, n);
  check_threads("gelu_tanh_cpu", threads);
  if (dtype == "float32") {
    auto* o = reinterpret_cast<float*>(out);
    const auto* in = reinterpret_cast<const float*>(x);
    parallel_ranges(n, kMinPerThread, threads, [&](std::int64_t first, std::int64_t last) {
      if (out == x) {
        gelu_f32_inplace(o, first, last);
      } else {
        gelu_f32_range(o, in, first, last);
      }
    });
  } else if (dtype == "float64") {
    parallel_ranges(n, kMinPerThread, threads, [&](std::int64_t first, std::int64_t last) {
      gelu_f64_range(reinterpret_cast<double*>(out), reinterpret_cast<const double*>(x), first, last);
    });
  } else {
    throw std::invalid_argument("gelu_tanh_cpu: dtype must be float32 or float64, got '" + dtype + "'");
  }
}

}  // namespace blitzdiff
