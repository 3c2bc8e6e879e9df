"""ONNX Runtime as the network behind `Pipeline.compile("onnxruntime")` (ARCHITECTURE.md contract 7).

`network(pipe, buckets, ...)` exports the pipeline's denoiser (blitzdiff.export.export_onnx; batch 1 .. 2 x the
largest bucket, since a guided call runs [uncond; cond]) and opens it in ONNX Runtime. The engine's loop then calls
the `OrtNetwork` exactly as it calls the torch network, fn(sample, timestep, class_labels=...,
encoder_hidden_states=...) -> out_sample, so guidance, solvers, per-sample noise and the NaN guard are the engine's
own. Each set of input shapes gets static torch buffers bound once with IO binding (ONNX Runtime reads and writes
torch memory: no numpy copies, device pointers on CUDA); a call copies its inputs into them and runs. With
cuda_graph=True the CUDA provider captures one CUDA graph per shape set (run option gpu_graph_id), which needs
exactly those fixed buffers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.inputs import positive_int
from .manifest import read_manifest, weights_digest
from .onnx import export_onnx
from .session import NUMPY_DTYPES, OnnxGraph

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")  # they read CUDA memory


def network(pipe: Any, buckets: Sequence[int], *, providers: Sequence[Any] | None = None,
            export_dir: str | Path | None = None, threads: int | None = None, cuda_graph: bool = False,
            size: Sequence[Sequence[int]] | None = None) -> OrtNetwork:
    """The factory EXTERNAL_MODES names. providers: ONNX Runtime execution providers in order (names or (name,
    options) pairs; default CPUExecutionProvider on CPU, CUDAExecutionProvider on CUDA). export_dir: a folder to
    export into and keep (reused as is when it holds this network's export: same class, config, dtype, weights
    digest and size range, covering the batches); default a temporary folder removed with the network. threads: ONNX
    Runtime's intra-op threads (default torch.get_num_threads(), so both run on the same cores). cuda_graph: capture a
    CUDA graph per input shape (CUDA provider only). size: a UNet's dynamic height / width range in latent pixels
    (export_onnx's size), so that pipe.sample(height=..., width=...) runs other sizes; default the sample size only."""
    import onnxruntime

    device = pipe.device
    providers = list(providers or (["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]))
    names = [p if isinstance(p, str) else p[0] for p in providers]
    available = onnxruntime.get_available_providers()
    missing = [name for name in names if name not in available]
    if missing:
        raise ValueError(f"ONNX Runtime provider(s) {', '.join(missing)} are not available in this onnxruntime "
                         f"({onnxruntime.__version__}); available: {', '.join(available)}")
    if (names[0] in GPU_PROVIDERS) != (device.type == "cuda"):
        raise ValueError(f"provider {names[0]} does not run on the pipeline's device {device}: on CPU use "
                         f"CPUExecutionProvider, on CUDA {' or '.join(GPU_PROVIDERS)} (onnxruntime-gpu)")
    if cuda_graph and names[0] != "CUDAExecutionProvider":
        raise ValueError(f"cuda_graph=True needs CUDAExecutionProvider first, got {names[0]}")
    if cuda_graph:
        options = dict(providers[0][1]) if not isinstance(providers[0], str) else {}
        providers[0] = ("CUDAExecutionProvider", {**options, "enable_cuda_graph": "1"})
    if threads is not None:
        positive_int("threads", threads)
    return OrtNetwork(pipe, (1, 2 * max(buckets)), providers, export_dir, threads, cuda_graph, size)


class OrtNetwork:
    """The exported denoiser of a pipeline run by ONNX Runtime, with the torch network's calling convention."""

    def __init__(self, pipe: Any, batch: tuple[int, int], providers: list[Any], export_dir: str | Path | None,
                 threads: int | None, cuda_graph: bool, size: Sequence[Sequence[int]] | None):
        self.batch, self.providers, self.threads, self.cuda_graph = batch, providers, threads, cuda_graph
        self.size = None if size is None else [list(r) for r in size]
        self.device = pipe.device
        self.keep = export_dir is not None
        if export_dir is None:
            self.folder = Path(tempfile.mkdtemp(prefix="blitzdiff-ort-")) / "denoiser"
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder.parent, True)
        else:
            self.folder = Path(export_dir)
        self.load_weights(pipe, reuse=self.keep)

    def load_weights(self, pipe: Any, *, reuse: bool = False) -> None:
        """Export the pipeline's network (or, reuse, take the export already in the folder when it matches) and
        open it; called again after Pipeline.load_weights."""
        start = time.perf_counter()
        if reuse and self.folder.exists():  # the digest only here: export_onnx records its own
            self._check_reusable(pipe, weights_digest(pipe.model))
            self.export_s = None
        else:
            export_onnx(pipe, self.folder, what="denoiser", batch=self.batch, size=self.size, overwrite=True)
            self.export_s = time.perf_counter() - start
        self._open()
        self.load_s = time.perf_counter() - start

    def _check_reusable(self, pipe: Any, digest: str) -> None:
        manifest = read_manifest(self.folder)
        model = manifest["model"]
        config = json.loads(json.dumps(dict(pipe.model.config)))
        expected = {"what": ("denoiser", manifest["what"]), "model class": (pipe.model.diffusers_class, model["class"]),
                    "model config": (config, model["config"]),
                    "dtype": (str(pipe.dtype).removeprefix("torch."), model["dtype"]),
                    "weights (sha256)": (digest, model.get("weights_sha256")),
                    "size range": (self.size, [size[k] for k in ("height", "width")] if (size := manifest.get("size"))
                                   else None)}
        for what, (want, found) in expected.items():
            if want != found:
                raise ValueError(f"export_dir {self.folder} holds another export: its {what} differs from the "
                                 "pipeline's; pass a new folder (or none: a temporary one)")
        low, high = manifest["batch"]
        if low > self.batch[0] or high < self.batch[1]:
            raise ValueError(f"export_dir {self.folder} was exported for batch {low}..{high}; these buckets need "
                             f"{self.batch[0]}..{self.batch[1]} (guided calls run twice the bucket)")

    def _open(self) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.graph = OnnxGraph(self.folder, providers=self.providers, session_options=options)
        self.session = self.graph.session
        specs = self.graph.inputs
        self.dtype = getattr(torch, specs["sample"]["dtype"])
        self.input_dtypes = {name: getattr(torch, spec["dtype"]) for name, spec in specs.items()}
        output = self.graph.manifest["outputs"][0]
        self.output_dtype = getattr(torch, output["dtype"])
        self.output_shape = output["shape"]  # ["batch", C_out, H or "height", W or "width"]
        self.bindings: dict[tuple, _Binding] = {}

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                 encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """out_sample [B', C_out, H, W] in the export's dtype: the network's static output buffer for batch B',
        valid until the next call with that batch (the loop consumes it at once)."""
        given = {"sample": sample, "timestep": timestep, "class_labels": class_labels,
                 "encoder_hidden_states": encoder_hidden_states}
        inputs = {name: value for name, value in given.items() if value is not None}
        key = tuple((name, tuple(value.shape)) for name, value in inputs.items())
        binding = self.bindings.get(key)
        if binding is None:
            self.graph.check(dict(key))  # names, fixed dims, batch / height / width ranges: once per shape
            binding = self.bindings[key] = _Binding(self, inputs, len(self.bindings))
        return binding.run(inputs)

    def describe(self) -> dict[str, Any]:
        return {"runtime": "onnxruntime", "providers": self.session.get_providers(), "export_dir": str(self.folder),
                "kept": self.keep, "batch": list(self.batch), "dtype": str(self.dtype).removeprefix("torch."),
                "threads": self.threads or torch.get_num_threads(), "cuda_graph": self.cuda_graph,
                "size": self.size, "export_s": self.export_s, "load_s": self.load_s, "shapes_bound": len(self.bindings)}


class _Binding:
    """Static buffers for one set of input shapes, bound to the session once (IO binding)."""

    def __init__(self, net: OrtNetwork, inputs: dict[str, torch.Tensor], graph_id: int):
        import onnxruntime

        device = net.device
        self.session = net.session
        with torch.inference_mode(False):  # plain tensors: written in and out of pipe.sample's inference mode
            self.buffers = {name: torch.empty(value.shape, dtype=net.input_dtypes[name], device=device)
                            for name, value in inputs.items()}
            symbols = dict(zip(("batch", "channels", "height", "width"), inputs["sample"].shape, strict=True))
            shape = [symbols[dim] if isinstance(dim, str) else dim for dim in net.output_shape]
            self.output = torch.empty(shape, dtype=net.output_dtype, device=device)
        self.binding = self.session.io_binding()
        for name, buffer in self.buffers.items():
            self.binding.bind_input(name, *_memory(buffer))
        self.binding.bind_output(net.graph.output, *_memory(self.output))
        self.options = onnxruntime.RunOptions()
        if net.cuda_graph:
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            for name, value in inputs.items():
                self.buffers[name].copy_(value)  # casts timestep to the export's float32, sample to its dtype
        self.session.run_with_iobinding(self.binding, self.options)
        return self.output


def _memory(tensor: torch.Tensor) -> tuple[str, int, Any, list[int], int]:
    """IO binding's (device type, device id, element type, shape, pointer) of a contiguous torch tensor."""
    dtype = NUMPY_DTYPES[str(tensor.dtype).removeprefix("torch.")]
    device = tensor.device
    return device.type, device.index or 0, np.dtype(dtype).type, list(tensor.shape), tensor.data_ptr()
