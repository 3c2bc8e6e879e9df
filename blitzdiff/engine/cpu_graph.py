"""CPU graphs: one eager forward of a network recorded once per input layout, then replayed without the Python
that decided it.

At batch 1 a small UNet's eager forward on the CPU spends about half its time in Python (module calls, checks,
allocations around ~130 kernel calls for unet-digits) rather than in kernels. A capture runs the forward once
under a `TorchFunctionMode` that sees every torch call, while the models' direct kernel calls
(blitzdiff.kernels._library.call_cpu) report themselves; a replay then makes only the calls that compute:

- a direct kernel call again with the same arguments (pointers into the buffers the capture made, which the graph
  holds);
- a torch call that made a new tensor: called again on the captured tensors, into the captured result (`out=`
  forms where OUT_FORMS has them, else its new result copied in);
- an in-place torch call (`add_`, `copy_`, `x[i] = ...`, `inplace=True`): made again;
- views, metadata reads and `empty` allocations: nothing (their memory is the captured buffers').

The buffers the forward makes live in one arena (blitzdiff.engine.arena): a capture records the forward twice, first
for each buffer's lifetime, then with each buffer placed at an offset that no buffer alive at the same time overlaps
(dit-digits' guided batch-8 forward: 33.1 MiB of buffers in a 2.6 MiB arena, which stays in cache as an eager
forward's reused allocations do). A tensor the forward makes and keeps past its return (a module caching it) lives in
the arena too, and later replays write other buffers over it: such a network needs `CpuGraphs` off.

Like a CUDA graph: the inputs are copied into static buffers, and nothing the forward decided from them in Python
may change between calls of one layout; a call that reads tensor values on the host (`.item()`, `bool(t)`) ends
the capture (the forward then stays eager for that layout). Each capture is proven before use: its replay on
perturbed inputs must equal an eager forward on them bit for bit (a call the capture missed would leave a stale
buffer), else the layout stays eager. Each call (each sampling run's first call of a layout: CpuGraphs.run) checks
that the network's parameters were not changed since (their memory and version counters: in place too) nor its
kernel backends, and captures again when they were. Replacing a parameter object (`module.weight =
nn.Parameter(...)`) is not seen: `CpuGraphs.clear()` after it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..kernels._library import set_recorder
from .arena import Lifetime, plan_arena
from .inputs import positive_int
from .network import network_dtype

# torch calls returning something else than tensors that read no tensor values, only layouts and flags (a call
# returning a value read from a tensor, `.item()` or `bool(t)`, ends the capture: what the forward decides from it
# in Python would not be decided again)
METADATA = frozenset({"__get__", "size", "dim", "ndimension", "stride", "storage_offset", "is_contiguous", "data_ptr",
                      "numel", "nelement", "element_size", "is_floating_point", "is_complex", "get_device",
                      "is_inference", "__len__", "untyped_storage", "__format__", "__repr__"})
# calls that make a tensor without defined values: whatever reads it was written by a later call
EMPTY_FACTORIES = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
# name of a call making a new tensor -> its form writing into a given one (Tensor.add and torch.add alike): the same
# kernels, the same bits. F.linear's own out= form is not one (on a 3-D input it runs a matmul then adds the bias,
# where F.linear runs one addmm over the rows): _linear_step.
OUT_FORMS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "cat": torch.cat, "index_select": torch.index_select}
IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ior__",
                              "__iand__"})


DEFAULT_MAX_BYTES = 256 * 2**20  # the graphs' arenas together, at most


class CaptureRefused(RuntimeError):
    """The forward cannot be replayed (the reason says why); it runs eagerly."""


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in a call's arguments (lists, tuples and dicts looked into)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _storage(t: Tensor) -> int | None:
    """The address of t's storage; None for a tensor without one (oneDNN's opaque prepacked weights)."""
    return t.untyped_storage().data_ptr() if t.layout == torch.strided and not t.is_mkldnn else None


class _Recorder(TorchFunctionMode):
    """Records the calls of one forward (module docstring), in one of two passes. Without a plan it only notes the
    lifetime of each buffer the forward makes (blitzdiff.engine.arena) and holds nothing, so the forward frees its
    buffers as an eager one does; with `arena` and `plan` (each buffer's offset and size, in the order they are
    made) it records the replay steps and places each new buffer in the arena at its offset (the forward goes on
    with the arena's tensor, the same values)."""

    def __init__(self, arena: Tensor | None = None, plan: list[tuple[int, int]] | None = None):
        super().__init__()
        self.arena, self.plan = arena, plan
        self.steps: list[Callable[[], Any] | None] = []  # None in the first pass: only counted
        self.held: list[Any] = []  # every tensor and kernel object the steps point at
        self.depth = 0  # > 0 inside a torch call: the kernels it runs are its own, replayed with it
        self.made: list[tuple[int, int]] = []  # per new buffer, in order: (bytes, the step that first writes it)
        # The lifetimes (read from the first pass only: in the second every placed buffer shares the arena's storage)
        self.last_step: dict[int, int] = {}  # per new buffer (its index in made): the last step that uses it
        # storage address -> the new buffer there now (in the first pass a freed buffer's address may be reused)
        self.buffer_at: dict[int, int] = {}

    def _step(self, step: Callable[[], Any], tensors: list[Any]) -> None:
        """Append a replay step that reads or writes `tensors` (and other objects its kernel reads; the graph holds
        them all)."""
        for t in tensors:
            if isinstance(t, Tensor) and (buffer := self.buffer_at.get(_storage(t))) is not None:
                self.last_step[buffer] = len(self.steps)
        if self.plan is None:
            self.steps.append(None)
            return
        self.steps.append(step)
        self.held.extend(tensors)

    def native(self, kernel: Callable, args: tuple, keep: tuple) -> None:
        """A direct kernel call (blitzdiff.kernels._library.call_cpu)."""
        if self.depth == 0:
            self._step(_bind(kernel, args), list(keep))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.depth += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.depth -= 1
        if self.depth == 0:
            return self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args: tuple, kwargs: dict, out: Any) -> Any:
        """Record one torch call of the forward; returns what the forward gets: `out`, or its arena copy."""
        name = getattr(func, "__name__", "")
        arguments = _tensors((args, kwargs))
        if (name in IN_PLACE_DUNDERS or "out" in kwargs or kwargs.get("inplace") is True
                or (name.endswith("_") and not name.startswith("_"))):
            self._step(_bind(func, args, kwargs), arguments)
            return out
        results = _tensors(out)
        if not results:
            if name not in METADATA:
                raise CaptureRefused(f"the forward reads tensor values on the host ({name} returned "
                                     f"{type(out).__name__})")
            return out
        inputs = {_storage(t) for t in arguments if t.numel()} - {None}
        fresh = [t for t in results if t.numel() and _storage(t) not in inputs]
        if not fresh:
            if self.plan is not None:
                self.held.extend(results)  # views of what the graph holds: their memory is replayed
            return out
        if not isinstance(out, Tensor):
            raise CaptureRefused(f"{name} made several new tensors in one call")
        if _storage(out) is None:
            raise CaptureRefused(f"{name} made a tensor without storage ({out.layout})")
        nbytes = out.untyped_storage().nbytes()
        if self.plan is not None:
            out = self._place(out, nbytes, copy=name not in EMPTY_FACTORIES)
            self.held.append(out)
        self.buffer_at[_storage(out)] = len(self.made)
        self.made.append((nbytes, len(self.steps)))
        if name not in EMPTY_FACTORIES:
            self._step(_recompute(func, args, kwargs, out), [*arguments, out])
        return out

    def _place(self, out: Tensor, nbytes: int, copy: bool) -> Tensor:
        """`out` (a new buffer of nbytes) as a tensor in the arena at its planned offset, its values copied."""
        index = len(self.made)
        if index >= len(self.plan) or self.plan[index][1] != nbytes:
            raise CaptureRefused("the forward made other buffers when recorded again")
        placed = torch.empty(0, dtype=out.dtype).set_(
            self.arena.untyped_storage(), self.plan[index][0] // out.element_size() + out.storage_offset(),
            out.shape, out.stride())
        return placed.copy_(out) if copy else placed

    def lifetimes(self, output: Tensor) -> list[Lifetime]:
        """The new buffers' lifetimes in order of birth; the output's to the end of the replay."""
        last = dict(self.last_step)
        if (buffer := self.buffer_at.get(_storage(output))) is not None:
            last[buffer] = len(self.steps)
        return [Lifetime(nbytes, birth, last.get(index, birth)) for index, (nbytes, birth) in enumerate(self.made)]


def _bind(func: Callable, args: tuple, kwargs: dict | None = None) -> Callable[[], Any]:
    if kwargs:
        return lambda: func(*args, **kwargs)
    return lambda: func(*args)


def _recompute(func: Callable, args: tuple, kwargs: dict, out: Tensor) -> Callable[[], Any]:
    """A step that makes `out`'s values again from the captured arguments: into `out` by the call's `out=` form
    where OUT_FORMS names one (the same kernel: an elementwise add written into a new tensor and a copy cost twice
    the time at batch-1 sizes), else a new result copied into it."""
    form = OUT_FORMS.get(func.__name__)
    if form is not None:
        return lambda: form(*args, **kwargs, out=out)
    if func is torch.nn.functional.linear and not kwargs and (step := _linear_step(out, *args)) is not None:
        return step
    return lambda: out.copy_(func(*args, **kwargs))


def _linear_step(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Callable[[], Any] | None:
    """F.linear(x, weight, bias) into `out` as F.linear computes it for a contiguous x: one addmm (mm without a bias)
    over x's rows [N, in] (PyTorch's _flatten_nd_linear), written into out's rows [N, out]; None for other
    layouts. A copy of a [1024, 384] result would cost about as much as the GEMM's epilogue."""
    if not (x.is_contiguous() and out.is_contiguous() and weight.dim() == 2 and x.dim() >= 2
            and x.dtype == weight.dtype == out.dtype and (bias is None or bias.dtype == out.dtype)):
        return None  # (under autocast the call ran in another dtype, which out= forms do not)
    rows, dest, transposed = x.view(-1, x.shape[-1]), out.view(-1, out.shape[-1]), weight.t()
    if bias is None:
        return lambda: torch.mm(rows, transposed, out=dest)
    return lambda: torch.addmm(bias, rows, transposed, out=dest)


class CpuGraph:
    """One captured forward of `model` for inputs of one layout (module docstring): replay(inputs) -> the output
    buffer. Raises CaptureRefused where the forward cannot be replayed, or its buffers would take more than
    max_bytes."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, Tensor], max_bytes: int):
        self.model = model
        self.parameters = [*model.parameters(), *model.buffers()]
        if any(p.is_inference() for p in self.parameters):  # no version counter to see in-place changes by
            raise CaptureRefused("the network's parameters are inference tensors")
        self.kernel_modules = [module for module in model.modules() if hasattr(module, "backend")]
        self.state = self._state()
        self.inputs = {name: value.clone() for name, value in inputs.items()}  # the static input buffers
        forward(model, self.inputs)  # eager first: plans and packed weights are made outside the capture
        # Recorded twice: first for the lifetimes of the buffers the forward makes (freed as it goes, as in an eager
        # forward), then into one arena where buffers never alive at once share memory (blitzdiff.engine.arena).
        first, out = self._record(_Recorder())
        lifetimes, steps = first.lifetimes(out), len(first.steps)
        del first, out
        offsets, size = plan_arena(lifetimes)
        if size > max_bytes:
            raise CaptureRefused(f"the forward's buffers take more than max_bytes ({max_bytes} bytes)")
        arena = torch.empty(size, dtype=torch.uint8)
        plan = [(offset, life.nbytes) for offset, life in zip(offsets, lifetimes, strict=True)]
        recorder, self.output = self._record(_Recorder(arena, plan))
        if len(recorder.made) != len(lifetimes) or len(recorder.steps) != steps:
            raise CaptureRefused("the forward made other buffers when recorded again")
        self.steps, self.held, self.bytes = recorder.steps, [*recorder.held, arena], size
        self._prove()

    def _record(self, recorder: _Recorder) -> tuple[_Recorder, Tensor]:
        """(recorder, the forward's output) after one forward on the input buffers under `recorder`."""
        set_recorder(recorder)
        try:
            with recorder:
                out = forward(self.model, self.inputs)
        finally:
            set_recorder(None)
        if not isinstance(out, Tensor):
            raise CaptureRefused(f"the forward returned {type(out).__name__}, not a tensor")
        return recorder, out

    def _prove(self) -> None:
        """CaptureRefused unless a replay on perturbed inputs equals an eager forward on them, bit for bit."""
        perturbed = {name: _perturbed(value) for name, value in self.inputs.items()}
        expected = forward(self.model, perturbed)
        try:
            replayed = self.replay(perturbed)
        except RuntimeError as error:  # a step that cannot run again as recorded: the eager forward still can
            raise CaptureRefused(f"a replay failed: {error}") from error
        if not same_bits(replayed, expected):
            raise CaptureRefused("a replay on new inputs differs from the eager forward (a call the capture missed)")

    def _state(self) -> tuple[list, list]:
        """What the replay assumes of the network: its parameters' memory and in-place changes (version counters),
        and its modules' kernel backends (blitzdiff.models.set_backend)."""
        return ([(p.data_ptr(), p._version) for p in self.parameters],
                [module.backend for module in self.kernel_modules])

    def current(self) -> bool:
        """Whether the network is as captured (_state): ~40 us for unet-digits' 212 tensors and 55 modules."""
        return self._state() == self.state

    def replay(self, inputs: dict[str, Tensor]) -> Tensor:
        """The forward on `inputs` (the captured layout): the output buffer, valid until the next replay."""
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        for step in self.steps:
            step()
        return self.output


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether a and b hold the same values bit for bit, NaNs included (torch.equal calls no NaN equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def forward(model: torch.nn.Module, inputs: dict[str, Tensor]) -> Any:
    """model(sample, timestep, **cond): the loop's calling convention (inputs in that order)."""
    sample, timestep, *cond = inputs.values()
    return model(sample, timestep, **dict(zip(list(inputs)[2:], cond, strict=True)))


def _perturbed(t: Tensor) -> Tensor:
    """Other values in t's layout (its strides too: the eager forward must take the paths the capture took): floats
    moved by a unit normal draw, integers swapped between 0 and 1 (class labels stay in range)."""
    if t.is_floating_point():
        generator = torch.Generator(device=t.device).manual_seed(0)
        values = t + torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)
    else:
        values = t == 0
    return torch.empty_like(t).copy_(values)


class CpuGraphs:
    """The network as the eager loop calls it on the CPU, `fn(sample, timestep, **cond)`: each input layout (shapes,
    dtypes; torch's thread count, inference mode and CPU autocast) replays its own CpuGraph, at most `max_graphs` of
    them holding at most `max_bytes` of arenas together (the least recently used dropped). Eager where a capture was
    refused, while torch's profiler runs (profiles show the forward's own calls) or with gradients enabled. Returns
    a new tensor each call (the loop keeps some outputs across steps); a lock serializes the replays, which share
    buffers. Each call checks that its graph is current (CpuGraph.current); `run()` gives a sampling run's network,
    which checks each layout on its first call only."""

    def __init__(self, model: torch.nn.Module, *, max_graphs: int = 4, max_bytes: int = DEFAULT_MAX_BYTES):
        self.model = model
        self.max_graphs, self.max_bytes = positive_int("max_graphs", max_graphs), positive_int("max_bytes", max_bytes)
        self.graphs: OrderedDict[tuple, CpuGraph | str] = OrderedDict()  # key -> graph, or why it was refused
        self.lock = threading.Lock()

    def __call__(self, sample: Tensor, timestep: Tensor, **cond: Tensor) -> Tensor:
        return self.call({"sample": sample, "timestep": timestep, **cond})

    def run(self) -> GraphRun:
        """The network for one sampling run (the loop's calls of one `pipe.sample`)."""
        return GraphRun(self)

    def call(self, inputs: dict[str, Tensor], checked: set[tuple] | None = None) -> Tensor:
        """The network on inputs (sample, timestep, then the conditioning), replayed where a graph of their layout
        is kept and current. `checked`: the layouts whose graphs this run already found current, which are not
        checked again (CpuGraph.current reads every parameter's state: ~130 us a call for dit-digits after a
        replay has filled the caches, 1.3 ms of a 10-step batch-8 run)."""
        if torch.is_grad_enabled() or torch.autograd.profiler._is_profiler_enabled:
            return forward(self.model, inputs)
        # not the strides: a replay copies the inputs into its own buffers, which the forward saw; inference mode
        # (its buffers are inference tensors) and autocast (the dtypes torch's calls run in) change the forward
        key = (torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
               *((name, t.shape, t.dtype, t.device) for name, t in inputs.items()))
        with self.lock:
            graph = self.graphs.get(key)
            trusted = checked is not None and key in checked  # found current earlier in this run
            if graph is None or (isinstance(graph, CpuGraph) and not trusted and not graph.current()):
                graph = self._capture(key, inputs)
            self.graphs.move_to_end(key)
            if checked is not None:
                checked.add(key)
            if isinstance(graph, CpuGraph):
                return graph.replay(inputs).clone()
        return forward(self.model, inputs)

    def _capture(self, key: tuple, inputs: dict[str, Tensor]) -> CpuGraph | str:
        self.graphs.pop(key, None)  # a stale graph's buffers go before the new capture makes its own
        try:
            graph: CpuGraph | str = CpuGraph(self.model, inputs, self.max_bytes)
        except CaptureRefused as refused:
            graph = str(refused)
        self.graphs[key] = graph
        # the oldest go while there are too many, or their buffers and the new graph's pass max_bytes together
        while len(self.graphs) > self.max_graphs or (len(self.graphs) > 1 and self.bytes() > self.max_bytes):
            self.graphs.popitem(last=False)
        return graph

    def bytes(self) -> int:
        """The bytes of the kept graphs' arenas."""
        return sum(graph.bytes for graph in self.graphs.values() if isinstance(graph, CpuGraph))

    def clear(self) -> None:
        """Drop every graph (captured again on the next call of its layout)."""
        with self.lock:
            self.graphs.clear()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network takes its sample in: the model's."""
        return network_dtype(self.model)

    def stats(self) -> list[dict[str, Any]]:
        """Per input layout kept: its shapes, and the graph's steps and buffer bytes, or why it was refused."""
        return [{"threads": key[0], "shapes": {name: list(shape) for name, shape, *_ in key[3:]},
                 **({"steps": len(graph.steps), "bytes": graph.bytes} if isinstance(graph, CpuGraph)
                    else {"refused": graph})} for key, graph in self.graphs.items()]


class GraphRun:
    """CpuGraphs as one sampling run calls them (CpuGraphs.run): each layout's graph is checked against the network
    on the run's first call of that layout, not on every step. A change to the weights or kernel backends made
    during a run (from a callback) shows from the next run on."""

    def __init__(self, graphs: CpuGraphs):
        self.graphs = graphs
        self.checked: set[tuple] = set()  # the layouts found current in this run

    def __call__(self, sample: Tensor, timestep: Tensor, **cond: Tensor) -> Tensor:
        return self.graphs.call({"sample": sample, "timestep": timestep, **cond}, self.checked)

    @property
    def dtype(self) -> torch.dtype:
        return self.graphs.dtype
