"""An exported graph run by ONNX Runtime, checked against its manifest: `OnnxGraph(folder)(**inputs)`.

Inputs are checked before the run, each problem a ValueError naming the input and what the export allows: missing or
unexpected names, a batch outside the exported range or differing between inputs, shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .manifest import GRAPH, read_manifest

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bfloat16": None}


class OnnxGraph:
    """An export folder (blitzdiff.export.export_onnx) as an ONNX Runtime session.

    providers: ONNX Runtime execution providers in order of preference (default: CPU; a name or a (name, options)
    pair); session_options: an onnxruntime.SessionOptions (threads, optimization level). The manifest's files are
    verified (size and sha256) and its inputs compared with the graph's before the session is used.
    """

    def __init__(self, folder: str | Path, *, providers: Sequence[Any] = ("CPUExecutionProvider",),
                 session_options: Any = None):
        import onnxruntime

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        try:
            self.session = onnxruntime.InferenceSession(str(self.folder / GRAPH), sess_options=session_options,
                                                        providers=list(providers))
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
            raise ValueError(f"{self.folder / GRAPH}: ONNX Runtime cannot load it: {err}") from err
        graph_inputs = [i.name for i in self.session.get_inputs()]
        listed = [spec["name"] for spec in self.manifest["inputs"]]
        if graph_inputs != listed:
            raise ValueError(f"{self.folder}: the graph's inputs {graph_inputs} differ from the manifest's {listed}")
        self.inputs = {spec["name"]: spec for spec in self.manifest["inputs"]}
        self.output = self.manifest["outputs"][0]["name"]

    @property
    def batch_range(self) -> tuple[int, int]:
        low, high = self.manifest["batch"]
        return low, high

    def __call__(self, **inputs: torch.Tensor | np.ndarray | float) -> torch.Tensor:
        """Run the graph; returns its output as a CPU tensor."""
        missing = [name for name in self.inputs if name not in inputs]
        unexpected = [name for name in inputs if name not in self.inputs]
        if missing or unexpected:
            raise ValueError(f"inputs {sorted(inputs)} do not match the export's {list(self.inputs)}"
                             + (f"; missing {missing}" if missing else "")
                             + (f"; unexpected {unexpected}" if unexpected else ""))
        feeds = {name: self._array(name, value) for name, value in inputs.items()}
        batches = {name: feeds[name].shape[0] for name, spec in self.inputs.items() if spec["shape"][:1] == ["batch"]}
        low, high = self.batch_range
        if len(set(batches.values())) > 1:
            raise ValueError(f"the inputs disagree on the batch size: {batches}")
        batch = next(iter(batches.values()), low)
        if not low <= batch <= high:
            raise ValueError(f"batch {batch} is outside the exported range {low}..{high}; export with --batch "
                             f"covering it")
        (out,) = self.session.run([self.output], feeds)
        return torch.from_numpy(out)

    def _array(self, name: str, value: Any) -> np.ndarray:
        spec = self.inputs[name]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        dtype = NUMPY_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise ValueError(f"input {name!r} is {spec['dtype']}, which this runner cannot feed")
        expected = spec["shape"]
        fixed_ok = len(array.shape) == len(expected) and all(
            want == "batch" or want == got for want, got in zip(expected, array.shape, strict=True))
        if not fixed_ok:
            raise ValueError(f"input {name!r} has shape {list(array.shape)}; the export takes {expected}")
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"input {name!r} must hold integers ({spec['dtype']}), got {array.dtype}")
        return np.ascontiguousarray(array.astype(dtype, copy=False))
