// Fused solver step (ARCHITECTURE.md contracts 1-2): classifier-free guidance, the denoiser's preconditioning and
// the plan's linear update in one pass over memory.
//
//   g        = u + w * (c - u)               (guided: out = [u; c], 2n elements)   or   g = out   (n elements)
//              w = guidance_scale, or on the CPU per sample: guidance_rows[i / row_size] (float32 [n / row_size],
//              e.g. a Pipeline runtime's per-sample scales; guidance_rows == 0: the number)
//   denoised = c_skip * point + c_out * g     (c_skip == 0: c_out * g, as blitzdiff.engine.denoiser.Denoiser)
//   x_next   = sum_k coefs[k] * T_k           (in list order; T_k = *terms[k], or the new denoised where terms[k] == 0)
//
// `terms` lists the live terms of the plan's update in the sampling loop's order (x, D_0 .. D_3, P_0 .. P_3,
// noise; zero coefficients already dropped on the host), at most kMaxSolverStepTerms. Every buffer is contiguous
// with n elements of the one dtype `dtype` ("float32", "float64"; the CUDA kernel also takes "float16" and
// "bfloat16"); pointers arrive as integers (Tensor.data_ptr()) so the module never links to torch. The outputs
// must not overlap any input, except that the CPU kernel's x_next may be the very buffer of x, a history term or the
// point (the same pointer: each element is read before it is written; the eager loop updates its state in place);
// inputs may alias each other. Half types compute in float32, the others in their
// own precision; the D_0 term reads the denoised value as stored (rounded to dtype). The CPU kernel splits large
// calls over up to `threads` threads (parallel.h) in whole chunks: the same bits for any count, and takes
// denoised == 0 (not stored: the loop's stages whose estimate no later stage reads). Bad arguments throw
// std::invalid_argument (ValueError in Python), CUDA failures std::runtime_error.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace blitzdiff {

constexpr int kMaxSolverStepTerms = 10;  // x, D_0 .. D_3, P_0 .. P_3, noise

void solver_step_cpu(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
                     std::int64_t n, bool guided, const std::string& dtype, double c_skip, double c_out,
                     double guidance_scale, const std::vector<std::uintptr_t>& terms,
                     const std::vector<double>& coefs, std::int64_t threads, std::uintptr_t guidance_rows,
                     std::int64_t row_size);

// The sampling loop's fused stages prepared once, so that a stage's call passes only its pointers (the eager loop
// calls one per network evaluation; blitzdiff.engine.fused_step). A SolverStepPlan holds each stage's scalars and
// update coefficients (once per plan); a SolverStepRun adds what one run passes every stage (the state's size and
// dtype, guidance, threads). The arithmetic is solver_step_cpu's.
class SolverStepPlan {
 public:
  struct Stage {
    double c_skip;
    double c_out;
    std::vector<double> coefs;  // the live terms' coefficients, in the order their pointers are passed
  };
  using StageTuple = std::tuple<double, double, std::vector<double>>;  // (c_skip, c_out, coefs)
  using Coefs = std::optional<std::vector<double>>;

  // stages[k]: stage k's (c_skip, c_out, coefs), or nullopt where stage k is not run by the kernel. points: empty,
  // or per stage the coefficients of its evaluation point's live terms (the loop's point combination, computed
  // before the network call), or nullopt where the kernel does not compute stage k's point.
  explicit SolverStepPlan(const std::vector<std::optional<StageTuple>>& stages,
                          const std::vector<Coefs>& points = {});
  const std::vector<std::optional<Stage>>& stages() const { return stages_; }
  const std::vector<Coefs>& points() const { return points_; }

 private:
  std::vector<std::optional<Stage>> stages_;
  std::vector<Coefs> points_;
};

class SolverStepRun {
 public:
  SolverStepRun(std::shared_ptr<const SolverStepPlan> plan, std::int64_t n, const std::string& dtype, bool guided,
                double guidance_scale, std::uintptr_t guidance_rows, std::int64_t row_size, std::int64_t threads);
  // solver_step_cpu for stage `stage` of the plan: terms[0 .. count) its live terms' pointers (0: the new denoised);
  // throws std::invalid_argument for a stage the plan does not fuse, a wrong term count or null outputs.
  void operator()(std::int64_t stage, std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out,
                  std::uintptr_t point, const std::uintptr_t* terms, std::size_t count) const;
  // point = sum_k coefs[k] * terms[k] with stage `stage`'s point coefficients (one pass, the update's arithmetic);
  // throws std::invalid_argument for a stage whose point the plan does not fuse, a wrong term count or a null
  // output or term.
  void point(std::int64_t stage, std::uintptr_t point, const std::uintptr_t* terms, std::size_t count) const;
  std::int64_t size() const { return n_; }

 private:
  std::shared_ptr<const SolverStepPlan> plan_;
  std::int64_t n_;
  bool float64_ = false;
  bool guided_;
  double guidance_scale_;
  std::uintptr_t guidance_rows_;
  std::int64_t row_size_;
  std::int64_t threads_;
};

#ifdef BLITZDIFF_WITH_CUDA
// Enqueues the kernel on `stream` (a cudaStream_t as an integer) of the device whose context is current; does not
// synchronize, so it is safe inside CUDA graph capture.
void solver_step_cuda(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
                      std::int64_t n, bool guided, const std::string& dtype, double c_skip, double c_out,
                      double guidance_scale, const std::vector<std::uintptr_t>& terms,
                      const std::vector<double>& coefs, std::uintptr_t stream);
#endif

// Throws std::invalid_argument unless n >= 0, terms and coefs have the same length <= kMaxSolverStepTerms and,
// for n > 0, the output, out and point pointers are non-null (denoised may be null where denoised_optional).
void check_solver_step_args(std::uintptr_t denoised, std::uintptr_t x_next, std::uintptr_t out, std::uintptr_t point,
                            std::int64_t n, const std::vector<std::uintptr_t>& terms,
                            const std::vector<double>& coefs, bool denoised_optional = false);

}  // namespace blitzdiff
