// blitzdiff._C: pybind11 bindings for the csrc/ kernels. Pointers, sizes and streams are plain Python ints
// (Tensor.data_ptr(), Tensor.numel(), torch.cuda.Stream.cuda_stream); the GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include "solver_update.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "blitzdiff native kernels (pointer-based; no torch linkage). Wrapped by blitzdiff.kernels.";

  m.def("solver_update_cpu", &blitzdiff::solver_update_cpu, py::arg("out"), py::arg("x"), py::arg("d0"),
        py::arg("d1"), py::arg("noise"), py::arg("n"), py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"),
        py::arg("s"), py::call_guard<py::gil_scoped_release>(),
        "out = a*x + b*d0 + c*d1 + s*noise over n contiguous elements; d1/noise = 0 drops the term.");

#ifdef BLITZDIFF_WITH_CUDA
  m.def("solver_update_cuda", &blitzdiff::solver_update_cuda, py::arg("out"), py::arg("x"), py::arg("d0"),
        py::arg("d1"), py::arg("noise"), py::arg("n"), py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"),
        py::arg("s"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "As solver_update_cpu, enqueued on the CUDA stream `stream` (a cudaStream_t as an int) without syncing.");
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
