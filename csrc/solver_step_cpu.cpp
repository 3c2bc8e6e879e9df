// CPU kernel for the fused solver step; see solver_step.h for the contract.
//
// The common updates (one_pass: x, then the new estimate, then up to two more terms) run in one pass per element.
// Every other update is cache-blocked: the n elements are walked in chunks of kChunk. Within a chunk, guidance and
// preconditioning are each one flat loop (restrict pointers, no branches) that GCC / Clang vectorize at -O3, and the
// update is a single pass summing every term per element (a loop unrolled for each term count). Every input is read
// from memory once and every output written once; guided and denoised values stay in L1 when not stored. The term
// order and the two-operation form of each step (acc + coef * t) follow the sampling loop's torch ops, so float64
// agrees with it to rounding.
#include <algorithm>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "parallel.h"
#include "solver_step.h"
#include "vectorize.h"

namespace blitzdiff {
namespace {

constexpr std::int64_t kChunk = 1024;  // 8 KiB of float64 per array: all the chunk's streams fit in L1
constexpr std::int64_t kChunksPerThread = 32;  // 32768 elements (~5 us on one core). Xeon, 2-term update, right
                                                // after a matmul (benchmarks/cpu_kernel_threads.py): 131072
                                                // elements 20.2 us on 2 threads vs 33.7 on 1; back to back, 65536:
                                                // 6.9 vs 10.0 us. Workers asleep (20 ms idle): ~50 us to wake. An
                                                // AMD EPYC once measured 8x4x64x64 faster on one thread.

// The helpers below are BLITZDIFF_INLINE (vectorize.h): inlined into each vector-width clone, so that each clone
// compiles the loops for its own target.

template <typename T>
BLITZDIFF_INLINE void guide(T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ c, T w, std::int64_t len) {
  for (std::int64_t i = 0; i < len; ++i) g[i] = u[i] + w * (c[i] - u[i]);
}

template <typename T>
BLITZDIFF_INLINE void precondition(T* __restrict__ d, const T* __restrict__ point, const T* __restrict__ g, T c_skip, T c_out,
                  std::int64_t len) {
  for (std::int64_t i = 0; i < len; ++i) d[i] = point[i] * c_skip + c_out * g[i];
}

template <typename T>
BLITZDIFF_INLINE void scale(T* __restrict__ d, const T* __restrict__ g, T c_out, std::int64_t len) {
  for (std::int64_t i = 0; i < len; ++i) d[i] = g[i] * c_out;
}

// x_next = sum_k coef[k] * t[k] over one chunk in a single pass (K loads and one store per element), K a compile-
// time count so that the term loop unrolls inside the vectorized element loop. The sum keeps the loop's order and
// two-operation form, c_0 t_0 + c_1 t_1 + ..., the same bits as one axpy pass per term (starting the sum at 0, one add
// more per element, cost 10% of an Euler update of 16384 floats and changed only the sign of a zero).
template <typename T, int K>
BLITZDIFF_INLINE void accumulate(T* acc, const T* const* terms, const T* coefs, std::int64_t len) {
  const T* t[K > 0 ? K : 1];
  T c[K > 0 ? K : 1];
  for (int k = 0; k < K; ++k) {
    t[k] = terms[k];
    c[k] = coefs[k];
  }
#pragma GCC ivdep  // acc may be a term's own buffer (solver_step.h): element i is read before it is written
  for (std::int64_t i = 0; i < len; ++i) {
    T a = K > 0 ? c[0] * t[0][i] : T(0);  // the loop's first term: coef * t
#pragma GCC unroll 16
    for (int k = 1; k < K; ++k) a = a + c[k] * t[k][i];
    acc[i] = a;
  }
}

template <typename T, int... Ks>
BLITZDIFF_INLINE void accumulate_n(std::integer_sequence<int, Ks...>, std::size_t count, T* acc, const T* const* terms,
                                   const T* coefs, std::int64_t len) {
  // one branch per count 0 .. kMaxSolverStepTerms, folded over the parameter pack
  ((count == static_cast<std::size_t>(Ks) ? accumulate<T, Ks>(acc, terms, coefs, len) : void()), ...);
}

// The common update x_next = c_0 x + c_1 D + c_2 t_2 + ... (x first, the new estimate D second, K terms in all) with
// c_skip != 0, in one pass: D = c_skip point + c_out g stays in a register (stored only where `den` is non-null), g
// from the guided halves u, c with one scale w. The same operations in the same order as guide, precondition and
// accumulate, so the same bits, without writing and re-reading the chunk's D (and g): a 2-term update of 131072
// floats 22.1 -> 19.9 us on one thread (AMD EPYC, torch's buffers, interleaved rounds).
template <typename T, int K, bool kGuided, bool kStore>
BLITZDIFF_INLINE void one_pass(T* next, T* __restrict__ den, const T* __restrict__ u,
                               const T* __restrict__ c, const T* p, const T* const* terms,
                               const T* coefs, T w, T skip, T cout, std::int64_t len) {
  const T* t[K];
  T cf[K];
  for (int k = 0; k < K; ++k) {
    t[k] = terms[k];
    cf[k] = coefs[k];
  }
#pragma GCC ivdep  // next may be x's or the point's buffer (solver_step.h): element i is read before it is written
  for (std::int64_t i = 0; i < len; ++i) {
    const T g = kGuided ? u[i] + w * (c[i] - u[i]) : u[i];
    const T d = p[i] * skip + cout * g;
    if constexpr (kStore) den[i] = d;
    T a = cf[0] * t[0][i] + cf[1] * d;
#pragma GCC unroll 8
    for (int k = 2; k < K; ++k) a = a + cf[k] * t[k][i];
    next[i] = a;
  }
}

constexpr int kOnePassMaxTerms = 4;  // x, D and up to two more: DDIM, Euler, DPM-Solver++(2M), (ancestral) noise

template <typename T, int K, bool kGuided>
BLITZDIFF_INLINE void one_pass_stored(T* next, T* den, const T* u, const T* c, const T* p, const T* const* terms,
                                      const T* coefs, T w, T skip, T cout, std::int64_t len) {
  if (den != nullptr) {
    one_pass<T, K, kGuided, true>(next, den, u, c, p, terms, coefs, w, skip, cout, len);
  } else {
    one_pass<T, K, kGuided, false>(next, den, u, c, p, terms, coefs, w, skip, cout, len);
  }
}

template <typename T, bool kGuided>
BLITZDIFF_INLINE void one_pass_n(std::size_t count, T* next, T* den, const T* u, const T* c, const T* p,
                                 const T* const* terms, const T* coefs, T w, T skip, T cout, std::int64_t len) {
  switch (count) {
    case 2: one_pass_stored<T, 2, kGuided>(next, den, u, c, p, terms, coefs, w, skip, cout, len); break;
    case 3: one_pass_stored<T, 3, kGuided>(next, den, u, c, p, terms, coefs, w, skip, cout, len); break;
    default: one_pass_stored<T, 4, kGuided>(next, den, u, c, p, terms, coefs, w, skip, cout, len); break;
  }
}

template <typename T>
BLITZDIFF_INLINE void step(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point, std::int64_t n,
          bool guided, double c_skip, double c_out, double guidance_scale, const float* rows, std::int64_t row_size,
          const std::uintptr_t* terms, const double* coefs, std::size_t count, std::int64_t begin, std::int64_t end) {
  auto* den = reinterpret_cast<T*>(denoised);
  auto* next = reinterpret_cast<T*>(x_next);
  const auto* o = reinterpret_cast<const T*>(out);
  const auto* p = reinterpret_cast<const T*>(point);
  // Scalars are rounded once to T, as PyTorch does for a Python float times a tensor of T.
  const T w = static_cast<T>(guidance_scale), skip = static_cast<T>(c_skip), cout = static_cast<T>(c_out);
  T coef[kMaxSolverStepTerms];
  for (std::size_t k = 0; k < count; ++k) coef[k] = static_cast<T>(coefs[k]);
  // x first, the new estimate second and no other term reading it: one_pass
  bool one = c_skip != 0.0 && count >= 2 && count <= static_cast<std::size_t>(kOnePassMaxTerms) && terms[0] != 0 &&
             terms[1] == 0;
  for (std::size_t k = 2; k < count; ++k) one = one && terms[k] != 0;
  if (one) {
    const T* t[kOnePassMaxTerms];
    const bool per_row = guided && rows != nullptr;
    for (std::int64_t i = begin; i < end;) {  // per row of one guidance scale (one row unless per_row)
      const std::int64_t stop = per_row ? std::min(end, (i / row_size + 1) * row_size) : end;
      for (std::size_t k = 0; k < count; ++k) t[k] = k == 1 ? nullptr : reinterpret_cast<const T*>(terms[k]) + i;
      T* den_at = den != nullptr ? den + i : nullptr;
      if (guided) {
        const T scale_i = per_row ? static_cast<T>(rows[i / row_size]) : w;
        one_pass_n<T, true>(count, next + i, den_at, o + i, o + n + i, p + i, t, coef, scale_i, skip, cout, stop - i);
      } else {
        one_pass_n<T, false>(count, next + i, den_at, o + i, nullptr, p + i, t, coef, w, skip, cout, stop - i);
      }
      i = stop;
    }
    return;
  }
  // d_buf: the chunk's denoised values when they are not stored. Cache-line aligned, as torch's buffers are, so that
  // no 512-bit access straddles two lines.
  alignas(64) T g_buf[kChunk];
  alignas(64) T d_buf[kChunk];
  for (std::int64_t start = begin; start < end; start += kChunk) {
    const std::int64_t len = std::min(kChunk, end - start);
    const T* g = o + start;
    if (guided && rows == nullptr) {  // out = [u; c], each n elements
      guide(g_buf, o + start, o + n + start, w, len);
      g = g_buf;
    } else if (guided) {  // one scale per row of row_size elements: the chunk split where rows change
      for (std::int64_t i = start; i < start + len;) {
        const std::int64_t row = i / row_size, stop = std::min(start + len, (row + 1) * row_size);
        guide(g_buf + (i - start), o + i, o + n + i, static_cast<T>(rows[row]), stop - i);
        i = stop;
      }
      g = g_buf;
    }
    T* d = den != nullptr ? den + start : d_buf;
    if (c_skip != 0.0) {
      precondition(d, p + start, g, skip, cout, len);
    } else {
      scale(d, g, cout, len);
    }
    const T* t[kMaxSolverStepTerms];
    for (std::size_t k = 0; k < count; ++k) t[k] = terms[k] == 0 ? d : reinterpret_cast<const T*>(terms[k]) + start;
    accumulate_n(std::make_integer_sequence<int, kMaxSolverStepTerms + 1>(), count, next + start, t, coef, len);
  }
}

// out = sum_k coefs[k] * terms[k] over elements begin .. end-1: a point combination, accumulate's arithmetic.
template <typename T>
BLITZDIFF_INLINE void combination(std::uintptr_t out, const std::uintptr_t* terms, const double* coefs,
                                  std::size_t count, std::int64_t begin, std::int64_t end) {
  T coef[kMaxSolverStepTerms];
  const T* t[kMaxSolverStepTerms];
  for (std::size_t k = 0; k < count; ++k) {
    coef[k] = static_cast<T>(coefs[k]);
    t[k] = reinterpret_cast<const T*>(terms[k]) + begin;
  }
  accumulate_n(std::make_integer_sequence<int, kMaxSolverStepTerms + 1>(), count, reinterpret_cast<T*>(out) + begin,
               t, coef, end - begin);
}

// One clone per x86 vector width (vectorize.h): these memory-bound loops gain from wider loads and stores.
BLITZDIFF_CPU_CLONES void combination_f32(std::uintptr_t out, const std::uintptr_t* terms, const double* coefs,
                                          std::size_t count, std::int64_t begin, std::int64_t end) {
  combination<float>(out, terms, coefs, count, begin, end);
}

BLITZDIFF_CPU_CLONES void combination_f64(std::uintptr_t out, const std::uintptr_t* terms, const double* coefs,
                                          std::size_t count, std::int64_t begin, std::int64_t end) {
  combination<double>(out, terms, coefs, count, begin, end);
}

BLITZDIFF_CPU_CLONES void step_f32(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out,
                                   std::uintptr_t point, std::int64_t n, bool guided, double c_skip, double c_out,
                                   double guidance_scale, const float* rows, std::int64_t row_size,
                                   const std::uintptr_t* terms, const double* coefs, std::size_t count,
                                   std::int64_t begin, std::int64_t end) {
  step<float>(denoised, x_next, out, point, n, guided, c_skip, c_out, guidance_scale, rows, row_size, terms, coefs,
           count, begin, end);
}

BLITZDIFF_CPU_CLONES void step_f64(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out,
                                   std::uintptr_t point, std::int64_t n, bool guided, double c_skip, double c_out,
                                   double guidance_scale, const float* rows, std::int64_t row_size,
                                   const std::uintptr_t* terms, const double* coefs, std::size_t count,
                                   std::int64_t begin, std::int64_t end) {
  step<double>(denoised, x_next, out, point, n, guided, c_skip, c_out, guidance_scale, rows, row_size, terms, coefs,
           count, begin, end);
}

// std::invalid_argument ("<op>: x_next, out and point must be non-null pointers", denoised too unless optional)
// when a call with n > 0 elements lacks one of its buffers.
void check_pointers(const std::string& op, std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out,
                    std::uintptr_t point, std::int64_t n, bool denoised_optional) {
  if (n > 0 && ((denoised == 0 && !denoised_optional) || x_next == 0 || out == 0 || point == 0)) {
    throw std::invalid_argument(op + (denoised_optional ? ": " : ": denoised, ") +
                                "x_next, out and point must be non-null pointers");
  }
}

}  // namespace

void check_solver_step_args(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
                            std::int64_t n, const std::vector<std::uintptr_t>& terms,
                            const std::vector<double>& coefs, bool denoised_optional) {
  if (n < 0) throw std::invalid_argument("solver_step: n must be >= 0, got " + std::to_string(n));
  if (terms.size() != coefs.size()) {
    throw std::invalid_argument("solver_step: " + std::to_string(terms.size()) + " terms but " +
                                std::to_string(coefs.size()) + " coefficients");
  }
  if (terms.size() > static_cast<std::size_t>(kMaxSolverStepTerms)) {
    throw std::invalid_argument("solver_step: at most " + std::to_string(kMaxSolverStepTerms) + " terms, got " +
                                std::to_string(terms.size()));
  }
  check_pointers("solver_step", denoised, x_next, out, point, n, denoised_optional);
}

namespace {

using StepFn = decltype(&step_f32);

StepFn step_for(const std::string& dtype, const char* op) {
  if (dtype == "float32") return step_f32;
  if (dtype == "float64") return step_f64;
  throw std::invalid_argument(std::string(op) + ": dtype must be float32 or float64, got '" + dtype + "'");
}

void check_rows(const char* op, std::int64_t n, std::uintptr_t guidance_rows, std::int64_t row_size) {
  if (guidance_rows != 0 && (row_size < 1 || n % row_size != 0)) {
    throw std::invalid_argument(std::string(op) + ": with guidance_rows, row_size must be >= 1 and divide n (" +
                                std::to_string(n) + "), got " + std::to_string(row_size));
  }
}

// Whole chunks per thread: every element is computed the same way whatever the split (the same bits).
void run_step(StepFn step_t, std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
              std::int64_t n, bool guided, double c_skip, double c_out, double guidance_scale,
              std::uintptr_t guidance_rows, std::int64_t row_size, const std::uintptr_t* terms, const double* coefs,
              std::size_t count, std::int64_t threads) {
  const auto* rows = reinterpret_cast<const float*>(guidance_rows);
  parallel_ranges((n + kChunk - 1) / kChunk, kChunksPerThread, threads, [&](std::int64_t first, std::int64_t last) {
    step_t(denoised, x_next, out, point, n, guided, c_skip, c_out, guidance_scale, rows, row_size, terms, coefs,
           count, first * kChunk, std::min(last * kChunk, n));
  });
}

}  // namespace

void solver_step_cpu(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
                     std::int64_t n, bool guided, const std::string& dtype, double c_skip, double c_out,
                     double guidance_scale, const std::vector<std::uintptr_t>& terms,
                     const std::vector<double>& coefs, std::int64_t threads, std::uintptr_t guidance_rows,
                     std::int64_t row_size) {
  check_solver_step_args(denoised, x_next, out, point, n, terms, coefs, /*denoised_optional=*/true);
  check_threads("solver_step_cpu", threads);
  check_rows("solver_step_cpu", n, guidance_rows, row_size);
  run_step(step_for(dtype, "solver_step_cpu"), denoised, x_next, out, point, n, guided, c_skip, c_out, guidance_scale,
           guidance_rows, row_size, terms.data(), coefs.data(), terms.size(), threads);
}

SolverStepPlan::SolverStepPlan(const std::vector<std::optional<StageTuple>>& stages, const std::vector<Coefs>& points)
    : points_(points) {
  if (!points.empty() && points.size() != stages.size()) {
    throw std::invalid_argument("SolverStepPlan: points must be empty or one entry per stage (" +
                                std::to_string(stages.size()) + "), got " + std::to_string(points.size()));
  }
  for (const auto& point : points) {
    if (point && point->size() > static_cast<std::size_t>(kMaxSolverStepTerms)) {
      throw std::invalid_argument("SolverStepPlan: at most " + std::to_string(kMaxSolverStepTerms) +
                                  " terms a point, got " + std::to_string(point->size()));
    }
  }
  stages_.reserve(stages.size());
  for (const auto& stage : stages) {
    if (!stage) {
      stages_.emplace_back();
      continue;
    }
    const auto& [c_skip, c_out, coefs] = *stage;
    if (coefs.size() > static_cast<std::size_t>(kMaxSolverStepTerms)) {
      throw std::invalid_argument("SolverStepPlan: at most " + std::to_string(kMaxSolverStepTerms) +
                                  " terms a stage, got " + std::to_string(coefs.size()));
    }
    stages_.emplace_back(Stage{c_skip, c_out, coefs});
  }
}

SolverStepRun::SolverStepRun(std::shared_ptr<const SolverStepPlan> plan, std::int64_t n, const std::string& dtype,
                             bool guided, double guidance_scale, std::uintptr_t guidance_rows, std::int64_t row_size,
                             std::int64_t threads)
    : plan_(std::move(plan)),
      n_(n),
      guided_(guided),
      guidance_scale_(guidance_scale),
      guidance_rows_(guidance_rows),
      row_size_(row_size),
      threads_(threads) {
  if (plan_ == nullptr) throw std::invalid_argument("SolverStepRun: plan must not be None");
  if (n < 0) throw std::invalid_argument("SolverStepRun: n must be >= 0, got " + std::to_string(n));
  check_threads("SolverStepRun", threads);
  check_rows("SolverStepRun", n, guidance_rows, row_size);
  float64_ = step_for(dtype, "SolverStepRun") == step_f64;
}

void SolverStepRun::operator()(std::int64_t stage, std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out,
                               std::uintptr_t point, const std::uintptr_t* terms, std::size_t count) const {
  const auto& stages = plan_->stages();
  if (stage < 0 || stage >= static_cast<std::int64_t>(stages.size()) || !stages[stage]) {
    throw std::invalid_argument("solver_step_stage: stage " + std::to_string(stage) + " is not a fused stage of a " +
                                std::to_string(stages.size()) + "-stage plan");
  }
  const SolverStepPlan::Stage& s = *stages[stage];
  if (count != s.coefs.size()) {
    throw std::invalid_argument("solver_step_stage: stage " + std::to_string(stage) + " takes " +
                                std::to_string(s.coefs.size()) + " terms, got " + std::to_string(count));
  }
  check_pointers("solver_step_stage", denoised, x_next, out, point, n_, /*denoised_optional=*/true);
  run_step(float64_ ? step_f64 : step_f32, denoised, x_next, out, point, n_, guided_, s.c_skip, s.c_out,
           guidance_scale_, guidance_rows_, row_size_, terms, s.coefs.data(), count, threads_);
}

void SolverStepRun::point(std::int64_t stage, std::uintptr_t point, const std::uintptr_t* terms,
                          std::size_t count) const {
  const auto& points = plan_->points();
  if (stage < 0 || stage >= static_cast<std::int64_t>(points.size()) || !points[stage]) {
    throw std::invalid_argument("solver_point_stage: stage " + std::to_string(stage) + " has no fused point in a " +
                                std::to_string(plan_->stages().size()) + "-stage plan");
  }
  const std::vector<double>& coefs = *points[stage];
  if (count != coefs.size()) {
    throw std::invalid_argument("solver_point_stage: stage " + std::to_string(stage) + "'s point takes " +
                                std::to_string(coefs.size()) + " terms, got " + std::to_string(count));
  }
  if (n_ > 0 && (point == 0 || std::find(terms, terms + count, std::uintptr_t{0}) != terms + count)) {
    throw std::invalid_argument("solver_point_stage: point and terms must be non-null pointers");
  }
  const auto combine = float64_ ? combination_f64 : combination_f32;
  parallel_ranges((n_ + kChunk - 1) / kChunk, kChunksPerThread, threads_, [&](std::int64_t first, std::int64_t last) {
    combine(point, terms, coefs.data(), count, first * kChunk, std::min(last * kChunk, n_));
  });
}

}  // namespace blitzdiff
