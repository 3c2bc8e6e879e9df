"""TensorRT behind `Pipeline.compile("tensorrt")` (ARCHITECTURE.md contract 7), and refits.

`TrtNetwork`: an engine (blitzdiff.export.trt_engine.build_engine) on CUDA torch tensors, called like the torch
network (a context per profile, one shared scratch buffer, preallocated outputs, torch's current stream, no host
sync); `network(pipe, buckets)` is the factory Pipeline.compile calls. `refit_engine`: the weights of a new export of
the same network, without a rebuild. `compare_with_onnxruntime`: engine against ONNX Runtime (polygraphy). Written
against TensorRT 10.1+'s Python API; tensorrt and polygraphy are imported only when a function needs them.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .manifest import GRAPH, read_manifest
from .onnx import export_onnx
from .session import NUMPY_DTYPES
from .trt_engine import (
    PLAN,
    PRECISIONS,
    RECORD,
    build_engine,
    check_same_network,
    export_entry,
    read_record,
    record_difference,
    replace_bytes,
    require_tensorrt,
    torch_dtype,
    write_record,
)


def refit_engine(engine_dir: str | Path, export_dir: str | Path) -> None:
    """Put the weights of `export_dir` (an export of the same architecture) into the engine of `engine_dir` and
    re-serialize it; engine.json then records the new export."""
    check_same_network(read_record(engine_dir), read_manifest(export_dir), Path(export_dir))  # before TensorRT loads
    TrtNetwork(engine_dir, keep=True).refit(export_dir)


class TrtNetwork:
    """An engine folder run on CUDA torch tensors: the ExternalNetwork of Pipeline.compile("tensorrt").

    Calls are enqueued on torch's current stream and must be stream-ordered (the runtime runs one request at a
    time): the contexts share one scratch buffer and each profile's output buffer is reused by the next call.
    keep: write refits (load_weights, refit) back to the folder.
    """

    def __init__(self, engine_dir: str | Path, *, device: str | torch.device = "cuda", keep: bool = True):
        trt = self.trt = require_tensorrt()
        self.folder, self.keep = Path(engine_dir), keep
        self.record = read_record(self.folder)
        device = torch.device(device)
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self.stats: dict[str, Any] = {}  # filled by network(): export / build / refit seconds
        plan = (self.folder / PLAN).read_bytes()
        if hashlib.sha256(plan).hexdigest() != self.record["plan"]["sha256"]:
            raise ValueError(f"{self.folder / PLAN} does not match {RECORD}: truncated or replaced; build again")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise ValueError(f"{self.folder}: TensorRT {trt.__version__} on {torch.cuda.get_device_name()} cannot "
                                 f"load this engine (built by TensorRT {self.record['tensorrt']} on "
                                 f"{self.record['gpu']}); build it again here")
            self._contexts()

    def _contexts(self) -> None:
        trt, engine = self.trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        (self.output,) = [name for name in names if name not in self.inputs]  # out_sample (denoiser) / sample (vae)
        self.dtypes = {name: torch_dtype(trt, engine.get_tensor_dtype(name)) for name in names}
        self.dtype = self.dtypes[self.inputs[0]]  # sample / latent_sample: float32 as exported
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self.scratch = torch.empty(max(engine.device_memory_size_v2, 1), dtype=torch.uint8, device=self.device)
        self.profiles: dict[int, tuple[Any, dict[str, tuple[int, ...]], torch.Tensor]] = {}
        for index, batch in enumerate(self.record["profiles"]):
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            context.set_optimization_profile_async(index, stream)
            shapes = {name: tuple(engine.get_tensor_profile_shape(name, index)[0]) for name in self.inputs}
            for name, shape in shapes.items():  # min = opt = max: the profile's only shape, set once
                context.set_input_shape(name, shape)
            context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
            output = torch.empty(tuple(context.get_tensor_shape(self.output)), dtype=self.dtypes[self.output],
                                 device=self.device)  # [B', C_out, H, W]
            context.set_tensor_address(self.output, output.data_ptr())
            self.profiles[batch] = context, shapes, output

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | None = None,
                 class_labels: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                 ) -> torch.Tensor:
        """sample [B', C, H, W] (a VAE engine: its latent_sample, alone), timestep [B'], class_labels [B'] or
        encoder_hidden_states [B', T, D] -> the output [B', ...] in the profile's buffer, valid until the next call
        with that batch. Inputs are cast to the engine's dtypes (timestep float32, class labels int64, as exported)."""
        given = {self.inputs[0]: sample, "timestep": timestep, "class_labels": class_labels,
                 "encoder_hidden_states": encoder_hidden_states}
        inputs = {name: value for name, value in given.items() if value is not None}
        if set(inputs) != set(self.inputs):
            raise ValueError(f"the engine takes {', '.join(self.inputs)}; got {', '.join(inputs)}")
        batch = inputs[self.inputs[0]].shape[0]
        if batch not in self.profiles:
            raise ValueError(f"batch {batch} has no profile in this engine; it was built for batches "
                             f"{', '.join(map(str, self.profiles))}")
        context, shapes, output = self.profiles[batch]
        for name, value in inputs.items():
            if tuple(value.shape) != shapes[name] or value.device != self.device:
                raise ValueError(f"input {name!r} is {list(value.shape)} on {value.device}; the engine takes "
                                 f"{list(shapes[name])} on {self.device}")
            # A cast copy is freed on return; the caching allocator reuses its memory only for later work on this
            # stream, which runs after TensorRT has read it.
            context.set_tensor_address(name, value.to(self.dtypes[name]).contiguous().data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT could not enqueue the engine (its log above says why)")
        return output

    def refit(self, export_dir: str | Path) -> None:
        """Put the weights of an export of the same network into this engine (in place: every context runs them)."""
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        check_same_network(self.record, manifest, export_dir)
        trt, start = self.trt, time.perf_counter()
        torch.cuda.current_stream(self.device).synchronize()  # no enqueued run may read the weights being replaced
        refitter = trt.Refitter(self.engine, self.logger)
        parser = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser.refit_from_file(str(export_dir / GRAPH)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"{export_dir / GRAPH}: TensorRT cannot refit the engine from it: {errors}")
        missing = list(refitter.get_missing_weights())
        if missing or not refitter.refit_cuda_engine():
            raise RuntimeError(f"TensorRT could not refit the engine (weights not supplied: {missing[:5]})")
        self.record = {**self.record, "export": export_entry(manifest)}
        if self.keep:
            replace_bytes(self.folder / PLAN, self.engine.serialize())
            write_record(self.folder, self.record)
        self.stats["refit_s"] = time.perf_counter() - start

    def load_weights(self, pipe: Any) -> None:
        """After Pipeline.load_weights: export the pipeline's network again and refit the engine with it."""
        with tempfile.TemporaryDirectory(prefix="blitzdiff-trt-") as tmp:
            what, batch = self.record["export"]["what"], tuple(self.record["export"]["batch"])
            self.refit(export_onnx(pipe, Path(tmp) / what, what=what, batch=batch))

    def describe(self) -> dict[str, Any]:
        record = self.record
        return {"runtime": "tensorrt", "engine_dir": str(self.folder) if self.keep else None,
                "precision": record["precision"], "profiles": list(self.profiles), "tensorrt": record["tensorrt"],
                "gpu": record["gpu"], "engine_build_s": record["build_seconds"], **self.stats}


def network(pipe: Any, buckets: Sequence[int], *, precision: str = "fp32", engine_dir: str | Path | None = None,
            timing_cache: str | Path | None = None, workspace_gib: float | None = None) -> TrtNetwork:
    """The factory EXTERNAL_MODES names: export the pipeline's denoiser (batch 1 .. 2 x the largest bucket) and build
    an engine with a profile for every B in buckets and 2B (guided calls run [uncond; cond]). engine_dir: a folder to
    build into and keep; when it holds an engine of this network (same class and config, precision, TensorRT, GPU,
    covering the batches) it is reused, refit first unless its export's files (or weights digest) are the new
    export's. precision / timing_cache / workspace_gib: as build_engine."""
    if pipe.device.type != "cuda":
        raise ValueError(f"compile('tensorrt') runs TensorRT on an NVIDIA GPU, and this pipeline is on {pipe.device}: "
                         "move it to CUDA, or on CPU use compile('onnxruntime')")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    trt = require_tensorrt()
    batches = sorted({b for bucket in buckets for b in (bucket, 2 * bucket)})
    folder = None if engine_dir is None else Path(engine_dir)
    if folder is not None and folder.exists() and not (folder / RECORD).is_file():
        raise ValueError(f"engine_dir {folder} exists and holds no TensorRT engine ({RECORD}); pass a new folder")
    with torch.cuda.device(pipe.device), tempfile.TemporaryDirectory(prefix="blitzdiff-trt-") as tmp:
        start = time.perf_counter()
        export = export_onnx(pipe, Path(tmp) / "denoiser", batch=(1, batches[-1]))
        manifest, export_s, build_s = read_manifest(export), time.perf_counter() - start, None
        reuse = folder is not None and folder.exists()
        if reuse:
            record = read_record(folder)
            what = record_difference(record, manifest, precision=(record["precision"], precision),
                               TensorRT=(record["tensorrt"], trt.__version__),
                               GPU=(record["gpu"], torch.cuda.get_device_name()),
                               profiles=(set(batches) - set(record["profiles"]), set()))
            if what is not None:
                raise ValueError(f"engine_dir {folder} holds an engine that differs in its {what} from what this "
                                 "pipeline and these buckets need; pass a new folder (or none: a temporary one)")
        else:
            start, folder = time.perf_counter(), folder or Path(tmp) / "engine"  # a temporary engine: loaded, removed
            build_engine(export, folder, buckets=batches, precision=precision, timing_cache=timing_cache,
                         workspace_gib=workspace_gib)
            build_s = time.perf_counter() - start
        net = TrtNetwork(folder, device=pipe.device, keep=engine_dir is not None)
        built, weights = net.record["export"], manifest["model"].get("weights_sha256")
        same_weights = built["files"] == manifest["files"] or weights is not None and weights == built["model"].get(
            "weights_sha256")
        if reuse and not same_weights:  # same network, other weights: refit (and save) instead of a rebuild
            net.refit(export)
    net.stats.update(export_s=export_s, build_s=build_s, reused=reuse)
    return net


def compare_with_onnxruntime(export_dir: str | Path, engine_dir: str | Path, *, batch: int, atol: float, rtol: float,
                             seed: int = 0) -> dict[str, Any]:
    """Run the engine (its profile for `batch`) and ONNX Runtime's CPU provider on the same random inputs (polygraphy's
    Comparator); per output the max abs difference, max_rel = max abs / max |ONNX Runtime|, and passed = max abs <=
    atol + rtol * max |ONNX Runtime|. Inputs: normal samples and embeddings, timesteps uniform over the training
    range, class labels in range (DiT's null class included)."""
    export_dir, engine_dir = Path(export_dir), Path(engine_dir)
    manifest, record = read_manifest(export_dir), read_record(engine_dir)
    if record["export"]["files"] != manifest["files"]:
        raise ValueError(f"{engine_dir} was not built (or last refit) from {export_dir}: their files differ")
    if batch not in record["profiles"]:
        raise ValueError(f"batch {batch} has no profile in {engine_dir}; its profiles: {record['profiles']}")
    require_tensorrt()
    require_tensorrt("polygraphy")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    rng = np.random.default_rng(seed)
    config = manifest["model"]["config"]
    steps = manifest["scheduler_config"].get("num_train_timesteps", 1000)
    top_label = config.get("num_embeds_ada_norm", (config.get("num_class_embeds") or 1) - 1)
    feed = {}
    for spec in manifest["inputs"]:
        shape = [batch if dim == "batch" else dim for dim in spec["shape"]]
        if spec["name"] == "timestep":
            value = rng.uniform(0, steps - 1, shape)
        elif spec["dtype"] == "int64":
            value = rng.integers(0, top_label, shape, endpoint=True)
        else:
            value = rng.standard_normal(shape)
        feed[spec["name"]] = value.astype(NUMPY_DTYPES[spec["dtype"]])
    runners = [TrtRunner(EngineFromBytes((engine_dir / PLAN).read_bytes()),
                         optimization_profile=record["profiles"].index(batch)),
               OnnxrtRunner(SessionFromOnnx(str(export_dir / GRAPH), providers=["cpu"]))]
    (_, [engine_out]), (_, [ort_out]) = Comparator.run(runners, data_loader=[feed]).items()
    outputs = {}
    for spec in manifest["outputs"]:
        got, want = np.asarray(engine_out[spec["name"]], np.float64), np.asarray(ort_out[spec["name"]], np.float64)
        max_abs, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
        outputs[spec["name"]] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale else float("inf"),
                                 "passed": max_abs <= atol + rtol * scale}
    return {"batch": batch, "atol": atol, "rtol": rtol, "outputs": outputs,
            "passed": all(o["passed"] for o in outputs.values())}
