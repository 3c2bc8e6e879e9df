"""An exported graph run by ONNX Runtime, checked against its manifest: `OnnxGraph(folder)(**inputs)`.

Inputs are checked before the run, each problem a ValueError naming the input and what the export allows: missing or
unexpected names, a batch (or a dynamic height / width) outside the exported range, off its multiple or differing
between inputs, shapes, and dtypes: a float input is cast only where that is exact (float16 or bfloat16 into a
float32 input, integers such as diffusers' timesteps into a float one; Python numbers take the input's dtype); a
cast that would round (float32 into float16, float64 into float32) is refused, naming the dtype the export takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .manifest import GRAPH, read_manifest

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bfloat16": None}
EXACT_FLOATS = {"float32": ("float32", "float16", "bfloat16"), "float16": ("float16",)}  # input dtype -> exact sources


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
        size = self.manifest.get("size")
        self.ranges = {"batch": (*self.manifest["batch"], 1)}  # symbol -> (min, max, multiple)
        if size is not None:
            self.ranges.update(height=(*size["height"], size["multiple"]), width=(*size["width"], size["multiple"]))
        for spec in self.manifest["inputs"]:
            unknown = [dim for dim in spec["shape"] if isinstance(dim, str) and dim not in self.ranges]
            if unknown:
                raise ValueError(f"{self.folder}: input {spec['name']!r} has dims {unknown} that the manifest gives "
                                 "no range for")
        self.output = self.manifest["outputs"][0]["name"]

    @property
    def batch_range(self) -> tuple[int, int]:
        low, high = self.manifest["batch"]
        return low, high

    def __call__(self, **inputs: torch.Tensor | np.ndarray | float) -> torch.Tensor:
        """Run the graph; returns its output as a CPU tensor."""
        self.check({name: tuple(np.shape(value)) if not isinstance(value, torch.Tensor) else tuple(value.shape)
                    for name, value in inputs.items()})
        feeds = {name: self._array(name, value) for name, value in inputs.items()}
        (out,) = self.session.run([self.output], feeds)
        return torch.from_numpy(out)

    def check(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """ValueError unless `shapes` (input name -> shape) are what the export takes: every input and no other, the
        fixed dims, and each symbolic dim (batch, height, width) equal across inputs, in its range, on its multiple."""
        missing = [name for name in self.inputs if name not in shapes]
        unexpected = [name for name in shapes if name not in self.inputs]
        if missing or unexpected:
            raise ValueError(f"inputs {sorted(shapes)} do not match the export's {list(self.inputs)}"
                             + (f"; missing {missing}" if missing else "")
                             + (f"; unexpected {unexpected}" if unexpected else ""))
        found: dict[str, dict[str, int]] = {}  # symbol -> {input: its size}
        for name, spec in self.inputs.items():
            expected, shape = spec["shape"], list(shapes[name])
            if len(shape) != len(expected) or any(want != got for want, got in zip(expected, shape, strict=True)
                                                  if not isinstance(want, str)):
                raise ValueError(f"input {name!r} has shape {shape}; the export takes {expected}")
            for axis, dim in enumerate(expected):
                if isinstance(dim, str):
                    found.setdefault(dim, {})[name] = shape[axis]
        for symbol, sizes in found.items():
            if len(set(sizes.values())) > 1:
                raise ValueError(f"the inputs disagree on the {symbol} size: {sizes}")
            value, (low, high, multiple) = next(iter(sizes.values())), self.ranges[symbol]
            if not low <= value <= high:
                option = "--batch" if symbol == "batch" else "a size range (size=, --height / --width)"
                raise ValueError(f"{symbol} {value} is outside the exported range {low}..{high}; export with "
                                 f"{option} covering it")
            if value % multiple:
                raise ValueError(f"{symbol} {value} is not a multiple of {multiple} (the network's down-sampling); "
                                 f"the export takes multiples of {multiple} in {low}..{high}")

    def _array(self, name: str, value: Any) -> np.ndarray:
        spec = self.inputs[name]
        wanted = spec["dtype"]
        dtype = NUMPY_DTYPES.get(wanted)
        if dtype is None:
            raise ValueError(f"input {name!r} is {wanted}, which this runner cannot feed")
        if isinstance(value, torch.Tensor):
            source = str(value.dtype).removeprefix("torch.")
            tensor = value.detach().cpu()
            array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()  # numpy has no bfloat16
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            array, source = np.asarray(value, dtype=dtype), wanted  # a Python number takes the input's dtype
        else:
            array = np.asarray(value)
            source = array.dtype.name
        integer = np.issubdtype(array.dtype, np.integer)
        if np.issubdtype(dtype, np.integer) and not integer:
            raise ValueError(f"input {name!r} must hold integers ({wanted}), got {source}")
        if not np.issubdtype(dtype, np.integer) and not integer and source not in EXACT_FLOATS[wanted]:
            raise ValueError(f"input {name!r} is {source}; the export takes {wanted} (a cast would round): convert "
                             f"it first, e.g. x.to(torch.{wanted})")
        return np.ascontiguousarray(array.astype(dtype, copy=False))
