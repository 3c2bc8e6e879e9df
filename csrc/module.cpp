// blitzdiff._C: pybind11 bindings for the csrc/ kernels. Pointers, sizes and streams are plain Python ints
// (Tensor.data_ptr(), Tensor.numel(), torch.cuda.Stream.cuda_stream); the GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include "gaussian_noise.h"
#include "solver_update.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "blitzdiff native kernels (pointer-based; no torch linkage). Wrapped by blitzdiff.kernels.";

  m.def("solver_update_cpu", &blitzdiff::solver_update_cpu, py::arg("out"), py::arg("x"), py::arg("d0"),
        py::arg("d1"), py::arg("noise"), py::arg("n"), py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"),
        py::arg("s"), py::call_guard<py::gil_scoped_release>(),
        "out = a*x + b*d0 + c*d1 + s*noise over n contiguous elements; d1/noise = 0 drops the term.");
  m.def("gaussian_noise_cpu", &blitzdiff::gaussian_noise_cpu, py::arg("out"), py::arg("seeds"), py::arg("batch"),
        py::arg("count"), py::arg("stream"), py::arg("dtype"), py::call_guard<py::gil_scoped_release>(),
        "out [batch, count] = unit Gaussian noise, row b a function of (seeds[b], stream) only (int64 seeds).");
  m.def("noise_bits_cpu", &blitzdiff::noise_bits_cpu, py::arg("out"), py::arg("seeds"), py::arg("batch"),
        py::arg("stream"), py::arg("first"), py::arg("n"), py::call_guard<py::gil_scoped_release>(),
        "out int64 [batch, n] = the noise hash's 32-bit values for the counters first .. first+n-1.");

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
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
