// CPU kernel for the fused solver update; see solver_update.h for the contract.
#include <stdexcept>

#include "solver_update.h"

namespace blitzdiff {
namespace {

// One flat pass over n elements. The optional terms are compile-time flags so each of the four variants is a
// branch-free loop that GCC/Clang vectorize at -O3 (restrict: `out` never overlaps an input). The sum order
// ((a*x + b*d0) + c*d1) + s*noise matches the PyTorch reference.
template <typename T, bool kHasD1, bool kHasNoise>
void update(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ d0, const T* __restrict__ d1,
            const T* __restrict__ noise, std::int64_t n, T a, T b, T c, T s) {
  for (std::int64_t i = 0; i < n; ++i) {
    T acc = a * x[i] + b * d0[i];
    if constexpr (kHasD1) acc += c * d1[i];
    if constexpr (kHasNoise) acc += s * noise[i];
    out[i] = acc;
  }
}

template <typename T>
void dispatch(std::uintptr_t out, std::uintptr_t x, std::uintptr_t d0, std::uintptr_t d1, std::uintptr_t noise,
              std::int64_t n, double a, double b, double c, double s) {
  auto* o = reinterpret_cast<T*>(out);
  const auto* px = reinterpret_cast<const T*>(x);
  const auto* p0 = reinterpret_cast<const T*>(d0);
  const auto* p1 = reinterpret_cast<const T*>(d1);
  const auto* pn = reinterpret_cast<const T*>(noise);
  // Coefficients are rounded once to the accumulation type, as PyTorch does for a Python scalar times a tensor.
  const T ta = static_cast<T>(a), tb = static_cast<T>(b), tc = static_cast<T>(c), ts = static_cast<T>(s);
  if (p1 && pn) {
    update<T, true, true>(o, px, p0, p1, pn, n, ta, tb, tc, ts);
  } else if (p1) {
    update<T, true, false>(o, px, p0, p1, pn, n, ta, tb, tc, ts);
  } else if (pn) {
    update<T, false, true>(o, px, p0, p1, pn, n, ta, tb, tc, ts);
  } else {
    update<T, false, false>(o, px, p0, p1, pn, n, ta, tb, tc, ts);
  }
}

}  // namespace

void check_solver_update_args(std::uintptr_t out, std::uintptr_t x, std::uintptr_t d0, std::int64_t n) {
  if (n < 0) throw std::invalid_argument("solver_update: n must be >= 0, got " + std::to_string(n));
  if (n > 0 && (out == 0 || x == 0 || d0 == 0)) {
    throw std::invalid_argument("solver_update: out, x and d0 must be non-null pointers");
  }
}

void solver_update_cpu(std::uintptr_t out, std::uintptr_t x, std::uintptr_t d0, std::uintptr_t d1,
                       std::uintptr_t noise, std::int64_t n, const std::string& dtype, double a, double b, double c,
                       double s) {
  check_solver_update_args(out, x, d0, n);
  if (dtype == "float32") {
    dispatch<float>(out, x, d0, d1, noise, n, a, b, c, s);
  } else if (dtype == "float64") {
    dispatch<double>(out, x, d0, d1, noise, n, a, b, c, s);
  } else {
    throw std::invalid_argument("solver_update_cpu: dtype must be float32 or float64, got '" + dtype + "'");
  }
}

}  // namespace blitzdiff
