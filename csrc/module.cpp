// blitzdiff._C: pybind11 bindings for the csrc/ kernels. Pointers, sizes and streams are plain Python ints
// (Tensor.data_ptr(), Tensor.numel(), torch.cuda.Stream.cuda_stream); the GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::vector / std::optional arguments (solver_step's term lists and plans)

#include <cstdint>
#include <exception>
#include <stdexcept>

#include "attention.h"
#include "adaln_modulate.h"
#include "conv2d.h"
#include "conv2d_winograd.h"
#include "gaussian_noise.h"
#include "gelu.h"
#include "group_norm.h"
#include "solver_step.h"
#include "solver_update.h"
#include "timestep_embedding.h"

namespace py = pybind11;

namespace {

constexpr Py_ssize_t kStageArgs = 6;  // run, stage, denoised, x_next, out, point; then the term pointers
constexpr Py_ssize_t kPointArgs = 3;  // run, stage, point; then the term pointers
constexpr std::int64_t kReleaseGilFrom = 4096;  // elements: below, a call's arithmetic (<~0.3 us) costs about as
                                                // much as releasing and taking back the GIL

// Releases the GIL for its lifetime when asked to (and restores it on the way out of an exception too).
class GilRelease {
 public:
  explicit GilRelease(bool release) : state_(release ? PyEval_SaveThread() : nullptr) {}
  ~GilRelease() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

// A SolverStepRun's fast calls (solver_step_stage, solver_point_stage) take ints only through CPython's fast-call
// protocol rather than pybind11's argument machinery: ~0.1 us a call against ~0.5 us for solver_step_cpu's 15
// arguments, and the eager loop makes one or two per network evaluation. run: the SolverStepRun itself, type-checked
// (about 5 ns more than an address, and no stray pointer can reach the kernel). call(run, values, terms) runs the
// kernel with values[1 .. fixed) the fixed ints after the run and `terms` the term pointers after them.
template <typename Call>
PyObject* run_call(const char* name, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t fixed, const Call& call) {
  if (nargs < fixed || nargs > fixed + blitzdiff::kMaxSolverStepTerms) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd leading arguments and at most %d term pointers, got %zd arguments",
                 name, fixed, blitzdiff::kMaxSolverStepTerms, nargs);
    return nullptr;
  }
  // the run itself (its Python object, alive for the call): a wrong object is a TypeError, not a stray pointer
  py::detail::make_caster<blitzdiff::SolverStepRun> caster;
  if (!caster.load(py::handle(args[0]), /*convert=*/false)) {
    PyErr_Format(PyExc_TypeError, "%s: run must be a SolverStepRun, got %s", name, Py_TYPE(args[0])->tp_name);
    return nullptr;
  }
  const auto& run = py::detail::cast_op<const blitzdiff::SolverStepRun&>(caster);
  std::uintptr_t values[kStageArgs + blitzdiff::kMaxSolverStepTerms];
  for (Py_ssize_t i = 1; i < nargs; ++i) {  // TypeError for a non-int, OverflowError for a negative one
    values[i] = static_cast<std::uintptr_t>(PyLong_AsUnsignedLongLong(args[i]));
    if (values[i] == static_cast<std::uintptr_t>(-1) && PyErr_Occurred()) return nullptr;
  }
  try {
    GilRelease gil(run.size() >= kReleaseGilFrom);
    call(run, values, values + fixed, static_cast<std::size_t>(nargs - fixed));
  } catch (const std::invalid_argument& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// solver_step_stage(run, stage, denoised, x_next, out, point, *terms): the run's stage update.
PyObject* solver_step_stage(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return run_call("solver_step_stage", args, nargs, kStageArgs,
                  [](const blitzdiff::SolverStepRun& run, const std::uintptr_t* v, const std::uintptr_t* terms,
                     std::size_t count) {
                    run(static_cast<std::int64_t>(v[1]), v[2], v[3], v[4], v[5], terms, count);
                  });
}

// solver_point_stage(run, stage, point, *terms): the run's evaluation point of a stage.
PyObject* solver_point_stage(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return run_call("solver_point_stage", args, nargs, kPointArgs,
                  [](const blitzdiff::SolverStepRun& run, const std::uintptr_t* v, const std::uintptr_t* terms,
                     std::size_t count) { run.point(static_cast<std::int64_t>(v[1]), v[2], terms, count); });
}

PyMethodDef solver_step_stage_def = {
    "solver_step_stage", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(solver_step_stage)),
    METH_FASTCALL,
    "solver_step_stage(run, stage, denoised, x_next, out, point, *terms): stage `stage` of SolverStepRun `run` "
    "on these pointers (terms: the stage's live terms, 0 for the new denoised estimate)."};

PyMethodDef solver_point_stage_def = {
    "solver_point_stage", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(solver_point_stage)),
    METH_FASTCALL,
    "solver_point_stage(run, stage, point, *terms): point = the sum of stage `stage`'s point coefficients times "
    "these term pointers' tensors, for SolverStepRun `run`."};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "blitzdiff native kernels (pointer-based; no torch linkage). Wrapped by blitzdiff.kernels.";

  m.def("solver_update_cpu", &blitzdiff::solver_update_cpu, py::arg("out"), py::arg("x"), py::arg("d0"),
        py::arg("d1"), py::arg("noise"), py::arg("n"), py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"),
        py::arg("s"), py::call_guard<py::gil_scoped_release>(),
        "out = a*x + b*d0 + c*d1 + s*noise over n contiguous elements; d1/noise = 0 drops the term.");
  m.def("gaussian_noise_cpu", &blitzdiff::gaussian_noise_cpu, py::arg("out"), py::arg("seeds"), py::arg("batch"),
        py::arg("count"), py::arg("stream"), py::arg("dtype"), py::arg("threads") = 1,
        py::call_guard<py::gil_scoped_release>(),
        "out [batch, count] = unit Gaussian noise, row b a function of (seeds[b], stream) only (int64 seeds); on up "
        "to `threads` threads (the same bits for any count).");
  m.def("noise_bits_cpu", &blitzdiff::noise_bits_cpu, py::arg("out"), py::arg("seeds"), py::arg("batch"),
        py::arg("stream"), py::arg("first"), py::arg("n"), py::call_guard<py::gil_scoped_release>(),
        "out int64 [batch, n] = the noise hash's 32-bit values for the counters first .. first+n-1.");

  m.def("solver_step_cpu", &blitzdiff::solver_step_cpu, py::arg("denoised"), py::arg("x_next"), py::arg("out"),
        py::arg("point"), py::arg("n"), py::arg("guided"), py::arg("dtype"), py::arg("c_skip"), py::arg("c_out"),
        py::arg("guidance_scale"), py::arg("terms"), py::arg("coefs"), py::arg("threads") = 1,
        py::arg("guidance_rows") = 0, py::arg("row_size") = 0, py::call_guard<py::gil_scoped_release>(),
        "denoised = c_skip*point + c_out*(u + w*(c - u)) (or out), x_next = sum coefs[k]*terms[k] (0: denoised); "
        "on up to `threads` threads. w: guidance_scale, or float32 guidance_rows[i / row_size] where non-null; "
        "denoised = 0: not stored.");
  py::class_<blitzdiff::SolverStepPlan, std::shared_ptr<blitzdiff::SolverStepPlan>>(
      m, "SolverStepPlan",
      "Per stage of a plan, (c_skip, c_out, coefs) for solver_step_cpu, or None (not fused); points: empty, or per "
      "stage its point's coefficients, or None (not fused).")
      .def(py::init<const std::vector<std::optional<blitzdiff::SolverStepPlan::StageTuple>>&,
                    const std::vector<blitzdiff::SolverStepPlan::Coefs>&>(),
           py::arg("stages"), py::arg("points") = std::vector<blitzdiff::SolverStepPlan::Coefs>{});
  py::class_<blitzdiff::SolverStepRun>(m, "SolverStepRun",
                                       "A SolverStepPlan with one run's n, dtype, guidance and threads; called through "
                                       "solver_step_stage(run, ...).")
      .def(py::init([](std::shared_ptr<blitzdiff::SolverStepPlan> plan, std::int64_t n, const std::string& dtype,
                       bool guided, double guidance_scale, std::uintptr_t guidance_rows, std::int64_t row_size,
                       std::int64_t threads) {
             return std::make_unique<blitzdiff::SolverStepRun>(std::move(plan), n, dtype, guided, guidance_scale,
                                                               guidance_rows, row_size, threads);
           }),
           py::arg("plan"), py::arg("n"), py::arg("dtype"), py::arg("guided"), py::arg("guidance_scale"),
           py::arg("guidance_rows"), py::arg("row_size"), py::arg("threads"));
  m.add_object("solver_step_stage",
               py::reinterpret_steal<py::object>(PyCFunction_NewEx(&solver_step_stage_def, nullptr, nullptr)));
  m.add_object("solver_point_stage",
               py::reinterpret_steal<py::object>(PyCFunction_NewEx(&solver_point_stage_def, nullptr, nullptr)));
  m.def("adaln_modulate_cpu", &blitzdiff::adaln_modulate_cpu, py::arg("out"), py::arg("x"), py::arg("shift"),
        py::arg("scale"), py::arg("rows"), py::arg("tokens"), py::arg("dim"), py::arg("param_stride"), py::arg("eps"),
        py::arg("dtype"), py::arg("threads") = 1, py::call_guard<py::gil_scoped_release>(),
        "out[r] = LayerNorm(x[r]) * (1 + scale[r / tokens]) + shift[r / tokens] over rows of dim elements, on up "
        "to `threads` threads (the same bits for any count).");
  m.def("adaln_gated_residual_cpu", &blitzdiff::adaln_gated_residual_cpu, py::arg("out"), py::arg("residual"),
        py::arg("y"), py::arg("gate"), py::arg("rows"), py::arg("tokens"), py::arg("dim"), py::arg("param_stride"),
        py::arg("dtype"), py::arg("threads") = 1, py::call_guard<py::gil_scoped_release>(),
        "out[r] = residual[r] + gate[r / tokens] * y[r] over rows of dim elements, on up to `threads` threads.");
  m.def("timestep_embedding_cpu", &blitzdiff::timestep_embedding_cpu, py::arg("out"), py::arg("timesteps"),
        py::arg("t_stride"), py::arg("t_dtype"), py::arg("freqs"), py::arg("batch"), py::arg("dim"),
        py::arg("flip_sin_to_cos"), py::arg("scale"), py::arg("threads") = 1, py::call_guard<py::gil_scoped_release>(),
        "out float32 [batch, dim] = [sin, cos](scale * t * freqs) (flipped: [cos, sin]), zero-padded for odd dim; "
        "on up to `threads` threads.");
  m.def("gelu_tanh_cpu", &blitzdiff::gelu_tanh_cpu, py::arg("out"), py::arg("x"), py::arg("n"), py::arg("dtype"),
        py::arg("threads") = 1, py::call_guard<py::gil_scoped_release>(),
        "out = x / (1 + exp(-2 sqrt(2/pi) (x + 0.044715 x^3))), the tanh GELU, over n contiguous elements (out may "
        "be x); on up to `threads` threads.");
  m.def("group_norm_cpu", &blitzdiff::group_norm_cpu, py::arg("out"), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("scale"), py::arg("scale_stride"), py::arg("shift"), py::arg("shift_stride"),
        py::arg("residual"), py::arg("batch"), py::arg("channels"), py::arg("spatial"), py::arg("groups"),
        py::arg("eps"), py::arg("channels_last"), py::arg("silu"), py::arg("dtype"), py::arg("param_dtype"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "out = GroupNorm(x) [* weight + bias] [* (1 + scale) + shift] [-> SiLU] [+ residual]; 0 drops a term.");

  py::class_<blitzdiff::Conv2dNhwc>(m, "Conv2dNhwc",
                                    "A direct NHWC float32 convolution with its packed weight (conv2d.h).")
      .def(py::init<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                    std::int64_t, std::uintptr_t>(),
           py::arg("in_channels"), py::arg("out_channels"), py::arg("kernel_h"), py::arg("kernel_w"),
           py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("packed_weight"))
      .def("run", &blitzdiff::Conv2dNhwc::run, py::arg("out"), py::arg("x"), py::arg("bias"), py::arg("batch"),
           py::arg("height"), py::arg("width"), py::arg("threads"), py::arg("generic") = false,
           py::call_guard<py::gil_scoped_release>(),
           "out [batch, out_h, out_w, out_channels] = conv(x [batch, height, width, in_channels]) + bias (0: none) on "
           "up to `threads` threads; generic: the portable loop even where the AVX-512 one runs.");
  py::class_<blitzdiff::Conv2dWinograd>(m, "Conv2dWinograd",
                                        "A Winograd F(tile x tile, 3x3) NHWC float32 convolution with its transformed "
                                        "weight (conv2d_winograd.h).")
      .def(py::init<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::uintptr_t, std::int64_t>(),
           py::arg("in_channels"), py::arg("out_channels"), py::arg("pad_h"), py::arg("pad_w"),
           py::arg("packed_weight"), py::arg("tile") = 2)
      .def("run", &blitzdiff::Conv2dWinograd::run, py::arg("out"), py::arg("x"), py::arg("bias"), py::arg("batch"),
           py::arg("height"), py::arg("width"), py::arg("threads"), py::arg("generic") = false,
           py::call_guard<py::gil_scoped_release>(),
           "out [batch, height + 2 pad_h - 2, width + 2 pad_w - 2, out_channels] = conv3x3(x [batch, height, width, "
           "in_channels]) + bias (0: none) on up to `threads` threads; generic: the portable product loop.");
  m.def("attention_cpu", &blitzdiff::attention_cpu, py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("batch"), py::arg("heads"), py::arg("len_q"), py::arg("len_k"), py::arg("head_dim"),
        py::arg("q_stride_b"), py::arg("q_stride_h"), py::arg("q_stride_l"), py::arg("k_stride_b"),
        py::arg("k_stride_h"), py::arg("k_stride_l"), py::arg("v_stride_b"), py::arg("v_stride_h"),
        py::arg("v_stride_l"), py::arg("scale"), py::arg("threads") = 1, py::arg("generic") = false,
        py::call_guard<py::gil_scoped_release>(),
        "out (dense [B, Lq, H, D]) = softmax(q k^T * scale) v, float32, q / k / v read through their strides; on up "
        "to `threads` threads.");
  m.def("conv2d_nhwc_isa", &blitzdiff::conv2d_nhwc_isa,
        "'avx512f' where this CPU runs Conv2dNhwc's AVX-512 loop, else 'generic'.");

#ifdef BLITZDIFF_WITH_CUDA
  m.def("solver_update_cuda", &blitzdiff::solver_update_cuda, py::arg("out"), py::arg("x"), py::arg("d0"),
        py::arg("d1"), py::arg("noise"), py::arg("n"), py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"),
        py::arg("s"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "As solver_update_cpu, enqueued on the CUDA stream `stream` (a cudaStream_t as an int) without syncing.");
  m.def("gaussian_noise_cuda", &blitzdiff::gaussian_noise_cuda, py::arg("out"), py::arg("seeds"),
        py::arg("batch"), py::arg("count"), py::arg("stream"), py::arg("dtype"), py::arg("cuda_stream"),
        py::call_guard<py::gil_scoped_release>(),
        "As gaussian_noise_cpu on device pointers, enqueued on `cuda_stream` (a cudaStream_t as an int).");
  m.def("noise_bits_cuda", &blitzdiff::noise_bits_cuda, py::arg("out"), py::arg("seeds"), py::arg("batch"),
        py::arg("stream"), py::arg("first"), py::arg("n"), py::arg("cuda_stream"),
        py::call_guard<py::gil_scoped_release>(), "As noise_bits_cpu on device pointers, enqueued on `cuda_stream`.");
  m.def("solver_step_cuda", &blitzdiff::solver_step_cuda, py::arg("denoised"), py::arg("x_next"), py::arg("out"),
        py::arg("point"), py::arg("n"), py::arg("guided"), py::arg("dtype"), py::arg("c_skip"), py::arg("c_out"),
        py::arg("guidance_scale"), py::arg("terms"), py::arg("coefs"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(), "As solver_step_cpu, enqueued on the CUDA stream `stream`.");
  m.def("gelu_tanh_cuda", &blitzdiff::gelu_tanh_cuda, py::arg("out"), py::arg("x"), py::arg("n"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "As gelu_tanh_cpu on device pointers, enqueued on `stream` (a cudaStream_t as an int).");
  m.def("adaln_modulate_cuda", &blitzdiff::adaln_modulate_cuda, py::arg("out"), py::arg("x"), py::arg("shift"),
        py::arg("scale"), py::arg("rows"), py::arg("tokens"), py::arg("dim"), py::arg("param_stride"), py::arg("eps"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "As adaln_modulate_cpu on device pointers, enqueued on `stream` (a cudaStream_t as an int).");
  m.def("adaln_gated_residual_cuda", &blitzdiff::adaln_gated_residual_cuda, py::arg("out"), py::arg("residual"),
        py::arg("y"), py::arg("gate"), py::arg("rows"), py::arg("tokens"), py::arg("dim"), py::arg("param_stride"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "As adaln_gated_residual_cpu on device pointers, enqueued on `stream`.");
  m.def("timestep_embedding_cuda", &blitzdiff::timestep_embedding_cuda, py::arg("out"), py::arg("timesteps"),
        py::arg("t_stride"), py::arg("t_dtype"), py::arg("freqs"), py::arg("batch"), py::arg("dim"),
        py::arg("flip_sin_to_cos"), py::arg("scale"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "As timestep_embedding_cpu on device pointers, enqueued on `stream` (a cudaStream_t as an int).");
  m.def("attention_cuda", &blitzdiff::attention_cuda, py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("batch"), py::arg("heads"), py::arg("len_q"), py::arg("len_k"), py::arg("head_dim"),
        py::arg("q_stride_b"), py::arg("q_stride_h"), py::arg("q_stride_l"), py::arg("k_stride_b"),
        py::arg("k_stride_h"), py::arg("k_stride_l"), py::arg("v_stride_b"), py::arg("v_stride_h"),
        py::arg("v_stride_l"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "out (dense [B, Lq, H, D]) = softmax(q k^T * scale) v: flash-attention forward on `stream`, no sync.");
  m.def("group_norm_cuda_workspace", &blitzdiff::group_norm_cuda_workspace, py::arg("batch"), py::arg("channels"),
        py::arg("spatial"), py::arg("groups"), py::arg("dtype"),
        "Bytes of device scratch memory group_norm_cuda needs for these sizes.");
  m.def("group_norm_cuda", &blitzdiff::group_norm_cuda, py::arg("out"), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("scale"), py::arg("scale_stride"), py::arg("shift"), py::arg("shift_stride"),
        py::arg("residual"), py::arg("batch"), py::arg("channels"), py::arg("spatial"), py::arg("groups"),
        py::arg("eps"), py::arg("channels_last"), py::arg("silu"), py::arg("dtype"), py::arg("param_dtype"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "As group_norm_cpu on device pointers, with scratch `workspace`, enqueued on the CUDA stream `stream`.");
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
