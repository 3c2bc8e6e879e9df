"""The runtimes behind `Pipeline.compile(mode=...)`: batch buckets with static buffers, torch.compile, and CUDA
graphs of the whole loop or of each step (ARCHITECTURE.md contracts 3 and 6).

A request of n samples runs in the smallest bucket >= n (larger requests in chunks of the largest bucket). Each
bucket key — (bucket batch, latent shape, network dtype, scheduler, steps, eta, guided, conditioning layout) — owns
a `Program`: static input buffers (noise, seeds, conditioning, guidance scale as a device tensor) and the loop that
reads them. A new request copies its inputs into the buffers: new seeds, labels, prompts or guidance scales never
rebuild anything. Padding rows get zero noise and repeat the first real row's conditioning; every op of the loop is
per sample, so they never reach a real sample (tests/engine/test_runtime.py checks it with NaN padding).

Modes: "eager" runs the Program's loop as is (the reference the others are compared with; on the CPU its network
replays the pipeline's CPU graphs, blitzdiff.engine.cpu_graph, as the plain loop does); "compile" runs it with
the network torch.compile'd (and with compile_loop=True the whole loop, fullgraph); "graph" replays one CUDA graph
of the whole loop; "step" one CUDA graph per plan stage, with the callback between them; "onnxruntime" and
"tensorrt" run the eager loop around an external network (ARCHITECTURE.md contract 7): the module EXTERNAL_MODES
names exports the network and runs it (blitzdiff.export; imported by name when such a mode is chosen, so the engine
never depends on it), while guidance, solvers, noise and the NaN guard stay the engine's. Programs live in a bounded
LRU cache; replacing the weights' storage (or the model, its dtype or device, or the scheduler config) empties it,
while in-place weight updates (Pipeline.load_weights) are seen by every Program as is (an external network is told
to re-export or refit).
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import graphs
from .config import SchedulerConfig, resolve
from .denoiser import Denoiser, is_guided
from .functional import parameterization, postprocessing
from .network import Callback, NetworkCall, first_non_finite
from .noise import resolve_noise_backend
from .sampler import PlanRun
from .solvers import build_plan

# mode -> the module whose network(pipe, buckets, **options) builds the external network (the interface:
# ExternalNetwork in that module's docs and the README's "Export" section).
EXTERNAL_MODES = {"onnxruntime": "blitzdiff.export.ort_network", "tensorrt": "blitzdiff.export.trt"}
MODES = ("eager", "compile", "step", "graph", *EXTERNAL_MODES)
GRAPH_MODES = ("step", "graph")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LOOP_LIMIT = 4096  # compiled whole loops (compile_loop=True) one process may build: Dynamo's recompile limit for them


@dataclass(frozen=True)
class Request:
    """One sampling call, validated by the Pipeline. noise: float32 [n, C, h, w]; seeds: int64 [n]; cond / uncond:
    the network's keyword tensors [n, ...] (uncond only when guided); guidance_scale: a number, or float32 [n], one
    per sample."""

    noise: torch.Tensor
    seeds: torch.Tensor
    cond: Mapping[str, torch.Tensor]
    uncond: Mapping[str, torch.Tensor] | None
    guidance_scale: float | torch.Tensor
    steps: int
    sampler: str | None
    eta: float | None


@dataclass(frozen=True)
class ProgramKey:
    batch: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    scheduler: str  # the resolved scheduler class and fields, as sorted JSON
    sampler: str
    steps: int
    eta: float | None
    guided: bool
    cond: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]  # (name, shape after the batch dim, dtype)

    def describe(self) -> str:
        conds = ", ".join(f"{name} {list(shape)}" for name, shape, _ in self.cond) or "none"
        return (f"batch {self.batch}, shape {list(self.shape)}, {str(self.dtype).removeprefix('torch.')}, "
                f"{self.sampler} {self.steps} steps, {'guided' if self.guided else 'unguided'}, cond: {conds}")


def choose_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (n is at most the largest bucket: larger requests are chunked by the caller)."""
    return min(b for b in buckets if b >= n)


def check_options(mode: str, buckets: Sequence[int], max_graphs: int, compile_loop: bool,
                  device: torch.device, options: Mapping[str, Any]) -> tuple[int, ...]:
    """Validate Pipeline.compile's arguments; returns the buckets sorted and deduplicated."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if options and mode not in EXTERNAL_MODES:
        raise ValueError(f"option(s) {', '.join(sorted(options))} are for the external runtimes "
                         f"({', '.join(EXTERNAL_MODES)}), not mode={mode!r}")
    if compile_loop and mode != "compile":
        raise ValueError(f"compile_loop=True needs mode='compile', got mode={mode!r}")
    if mode in GRAPH_MODES and device.type != "cuda":
        raise ValueError(f"mode={mode!r} records CUDA graphs and needs the pipeline on a CUDA device, not "
                         f"{device}; on CPU use 'compile' or 'eager'")
    if not buckets or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in buckets):
        raise ValueError(f"buckets must be a non-empty sequence of ints >= 1, got {buckets!r}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
    return tuple(sorted(set(buckets)))


class Program:
    """One bucket key's static buffers and the loop over them, built for one mode."""

    def __init__(self, key: ProgramKey, config: SchedulerConfig, network: torch.nn.Module, channels: int,
                 device: torch.device, mode: str, compile_loop: bool, pool: Any, lock: threading.Lock):
        batch = key.batch
        self.key, self.mode, self.device = key, mode, device
        self.plan = build_plan(config, key.steps, eta=key.eta)
        self.noise = torch.zeros((batch, *key.shape), dtype=torch.float32, device=device)
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=device)
        cond = {name: torch.zeros((batch, *shape), dtype=dtype, device=device) for name, shape, dtype in key.cond}
        uncond = {name: torch.zeros_like(t) for name, t in cond.items()} if key.guided else None
        # The guidance scales are a device tensor [B] (one per row), so new ones are a copy, not a new graph.
        self.guidance = torch.ones(batch, dtype=torch.float32, device=device)
        self.call = NetworkCall(network, channels)
        kind, constants = parameterization(config)
        self.denoiser = Denoiser(self.call, self.plan, kind, batch=batch, device=device, cond=cond, uncond=uncond,
                                 guidance_scale=self.guidance if key.guided else 1.0, **constants)
        self.postprocess = postprocessing(config)
        self.noise_backend = resolve_noise_backend("auto", device, torch.float32)
        self.states: list[torch.Tensor] = []  # step mode: the state after each stage (static)
        self.stage_state: dict[str, PlanRun] = {}  # step mode: the PlanRun the stage graphs were captured from
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.noise, self.seeds, *self.denoiser.cond.values()))
        self.hits = 0
        self.build_s: float | None = None  # set by build(), which runs on the first request, under `lock`
        self.compile_loop, self.pool = compile_loop, pool
        # Held from loading a request's rows into the buffers until its results are copied out: this entry's own in
        # eager mode, else the Runtime's one run_lock (see Runtime).
        self.lock = lock

    def build(self) -> None:
        """Compile or capture the loop (once; the caller holds `lock`)."""
        if self.build_s is not None:
            return
        start = time.perf_counter()
        self._build(self.compile_loop, self.pool)
        self.build_s = time.perf_counter() - start

    # -- the loop over the static buffers ------------------------------------------------------------------------
    def _start(self) -> PlanRun:
        self.call.reset()
        # Fused eager stages where the loop runs in Python; a traced or captured loop keeps the plain ops (inductor
        # fuses them itself; a graph replays them).
        traced = self.compile_loop or self.mode in ("graph", "step")
        return PlanRun(self.plan, self.denoiser, self.noise * self.plan.init_scale, self.seeds, self.postprocess,
                       self.noise_backend, step_backend="ref" if traced else "auto")

    def _loop(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole loop: (final sample [B, ...], finiteness flags [E, B'], timesteps [E])."""
        run = self._start()
        for k in range(len(self.plan.stages)):
            run.stage(k)
        return run.output(), self.call.flags(), torch.stack(self.call.timesteps)

    def _build(self, compile_loop: bool, pool: Any) -> None:
        self.body = self._loop
        if self.mode == "compile" and compile_loop:
            self.body = torch.compile(self._loop, fullgraph=True, dynamic=False)
        if self.mode == "graph":
            graphs.warm_up(self._loop, self.device)
            self.graphs, (self.result,), captured = graphs.capture([self._loop], pool, self.device)
            self.nbytes += captured
        elif self.mode == "step":
            graphs.warm_up(self._loop, self.device)
            self.graphs, results, captured = graphs.capture(self._stage_parts(), pool, self.device)
            self.states, self.result = [state for state, _ in results], results[-1][1]
            self.nbytes += captured
        elif self.mode == "compile":
            self._call_body()  # compiles, so that build_s holds the compile time
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _call_body(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """self.body() with Dynamo's recompile limit raised: Dynamo caches compiled code per code object, so every
        Program's compiled loop is one more entry of Program._loop (two: the DiT's position-embedding cache fills
        on the first call), and past torch's limit (8) the next one would fail under fullgraph=True."""
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, LOOP_LIMIT)):
            return self.body()

    def _stage_parts(self) -> list:
        """One callable per stage for step mode; each returns (state after the stage, the final result or None).
        The loop state lives in self.stage_state, so the tensors one stage's graph hands the next (state, history,
        points) stay allocated for as long as the graphs do."""
        holder = self.stage_state = {}
        last = len(self.plan.stages) - 1

        def part(k: int):
            if k == 0:
                holder["run"] = self._start()
            run = holder["run"]
            run.stage(k)
            done = (run.output(), self.call.flags(), torch.stack(self.call.timesteps)) if k == last else None
            return run.x, done

        return [lambda k=k: part(k) for k in range(last + 1)]

    # -- serving a request -------------------------------------------------------------------------------------
    def load(self, request: Request, start: int, stop: int) -> None:
        """Copy rows start:stop of the request into the static buffers; padding rows get zero noise, seed 0 and the
        first copied row's conditioning."""
        n = stop - start
        self.noise[:n].copy_(request.noise[start:stop])
        self.noise[n:].zero_()
        self.seeds[:n].copy_(request.seeds[start:stop])
        self.seeds[n:].zero_()
        copies = ([request.uncond] if self.key.guided else []) + [request.cond]
        for name, buffer in self.denoiser.cond.items():  # [copies * B, ...]: uncond rows first when guided
            for c, source in enumerate(copies):
                rows = buffer[c * self.key.batch:(c + 1) * self.key.batch]
                rows[:n].copy_(source[name][start:stop])
                rows[n:].copy_(source[name][start:start + 1].expand_as(rows[n:]))
        if self.key.guided and isinstance(request.guidance_scale, torch.Tensor):
            self.guidance[:n].copy_(request.guidance_scale[start:stop])
            self.guidance[n:].fill_(1.0)
        elif self.key.guided:
            self.guidance.fill_(request.guidance_scale)

    def serve(self, request: Request, start: int, stop: int, callback: Callback | None,
              progress: Any) -> tuple[torch.Tensor, tuple[int, float] | None]:
        """Rows start:stop of the request, run in this entry: (their final samples, a copy [rows, ...], and the first
        non-finite evaluation among them or None). Holds `lock` throughout, so concurrent requests never share the
        static buffers."""
        rows = stop - start
        with self.lock:
            self.build()
            self.load(request, start, stop)
            out, flags, timesteps = self.run(callback, progress, rows)
            return out[:rows].clone(), first_non_finite(flags, timesteps, self.key.batch, rows)

    def run(self, callback: Callback | None, progress: Any, rows: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        """Run the loop on the loaded buffers: (final sample [B, ...], flags [E, B'], timesteps [E]). In step mode
        callback(stage, timestep [B'], state after the stage [rows, ...]) runs between the stages' graphs."""
        self.hits += 1
        if self.mode == "graph" or self.compile_loop:  # no host code runs inside: the bar counts the run at its end
            if self.compile_loop:
                result = self._call_body()
            else:
                self.graphs[0].replay()
                result = self.result
            if progress is not None:
                progress.update(len(self.plan.stages))
            return result
        if self.mode == "step":
            for k, graph in enumerate(self.graphs):
                graph.replay()
                if progress is not None:
                    progress.update(1)
                if callback is not None:
                    callback(k, self.denoiser.timesteps[k], self.states[k][:rows])
            return self.result
        self.call.callback, self.call.progress = callback, progress
        try:
            return self.body()
        finally:
            self.call.callback, self.call.progress = None, None


class Runtime:
    """The Programs of one pipeline in one mode: an LRU cache of at most max_graphs entries, one memory pool.

    Threads: `lock` guards the cache (entries, LRU order, evictions, the compiled network, the pool); it is held only
    to look up or insert an entry, never while a loop runs. Each entry serializes its own requests (Program.lock):
    requests of different keys run in parallel in eager mode. In the other modes every entry shares `run_lock`, so
    one loop runs at a time: graph / step captures and replays all use one memory pool (a graph's intermediates are
    free memory to the next capture); compiled CPU kernels split their OpenMP work by the threads a call gets, which
    a concurrent call changes (1 of 400 concurrent requests came out 1e-4 off its solo result), and results must
    not depend on what else runs.
    """

    def __init__(self, mode: str, buckets: Sequence[int], max_graphs: int, compile_loop: bool,
                 options: Mapping[str, Any] | None = None):
        self.mode, self.buckets, self.max_graphs, self.compile_loop = mode, tuple(buckets), max_graphs, compile_loop
        self.options = dict(options or {})  # external modes: keyword options of their network factory
        self.programs: OrderedDict[ProgramKey, Program] = OrderedDict()
        self.evictions = 0
        self.signature: tuple | None = None
        self.network: Any = None  # the model, its torch.compile wrapper, the CPU graphs, or an external network
        self.network_key: tuple | None = None  # what self.network was built from: (model id, weights' storage)
        self.weights_version = 0  # external modes: the Pipeline.weights_version the network runs
        self.pool: Any = None
        self.lock = threading.Lock()
        self.run_lock = threading.Lock() if mode != "eager" else None

    def prepare(self, pipe: Any) -> None:
        """Build the network now (an external mode exports and loads it here, so that its errors surface in
        Pipeline.compile, not in a later sample call) and after Pipeline.load_weights."""
        with self.lock:
            self._check_model(pipe)

    def _check_model(self, pipe: Any) -> None:
        """Empty the cache when the weights' storage, the model or the scheduler config changed since the build;
        rebuild the network when the model or its storage did; an external network is re-exported or refit after
        Pipeline.load_weights (the caller holds `lock`)."""
        model = pipe.model
        network_key = (id(model), tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters()),
                       id(pipe.cpu_graphs))
        signature = (network_key, json.dumps(pipe.scheduler_config, sort_keys=True, default=str))
        if signature != self.signature:
            self._clear()
            self.signature = signature
        if self.network is None or network_key != self.network_key:
            self.network, self.network_key = self._build_network(pipe), network_key
            self.weights_version = pipe.weights_version
        elif self.mode in EXTERNAL_MODES and pipe.weights_version != self.weights_version:
            self.network.load_weights(pipe)
            self.weights_version = pipe.weights_version

    def _build_network(self, pipe: Any) -> Any:
        if self.mode in EXTERNAL_MODES:
            module = importlib.import_module(EXTERNAL_MODES[self.mode])
            return module.network(pipe, self.buckets, **self.options)
        if self.mode == "compile":
            return torch.compile(pipe.model, dynamic=False)
        return pipe.cpu_network(pipe.model)  # eager: on the CPU the default path's replayed forwards (cpu_graph)

    def clear(self) -> None:
        """Drop every Program (their graphs, buffers and compiled code references); requests running in other
        threads finish on the entries they hold. The network is rebuilt (or re-exported) on the next request."""
        with self.lock:
            self._clear()
            self.network = self.network_key = None

    def _clear(self) -> None:
        self.programs.clear()
        self.signature = None

    def program(self, key: ProgramKey, config: SchedulerConfig, pipe: Any) -> Program:
        """The cached entry of `key`, or a new one (not yet built: Program.serve builds it under the entry's lock,
        not under the cache's)."""
        with self.lock:
            self._check_model(pipe)
            if key in self.programs:
                self.programs.move_to_end(key)
                return self.programs[key]
            if len(self.programs) >= self.max_graphs:
                self.programs.popitem(last=False)
                self.evictions += 1
            if self.mode in GRAPH_MODES and self.pool is None:
                self.pool = graphs.Pool()
            network = pipe.model if self.compile_loop else self.network
            program = Program(key, config, network, pipe.kind.prediction_channels, pipe.device, self.mode,
                              self.compile_loop, self.pool, self.run_lock or threading.Lock())
            self.programs[key] = program
            return program

    def sample(self, pipe: Any, request: Request, callback: Callback | None,
               progress: Any) -> tuple[torch.Tensor, tuple[int, float] | None]:
        """(final samples float32 [n, ...], the first non-finite evaluation among the real rows or None)."""
        if callback is not None and (self.mode == "graph" or self.compile_loop):
            raise ValueError("a callback needs the loop to stop between steps: use mode='step' (CUDA), 'eager' or "
                             "'compile' without compile_loop")
        config = resolve(request.sampler, pipe.scheduler_config)
        guided = is_guided(request.guidance_scale)
        n = request.noise.shape[0]
        scheduler = json.dumps({"class": config.class_name, **config.fields}, sort_keys=True, default=str)
        cond = tuple((name, tuple(t.shape[1:]), t.dtype) for name, t in sorted(request.cond.items()))
        outputs, bad = [], None
        for start in range(0, n, self.buckets[-1]):  # self.chunks(n) runs
            stop = min(n, start + self.buckets[-1])
            key = ProgramKey(batch=choose_bucket(stop - start, self.buckets), shape=tuple(request.noise.shape[1:]),
                             dtype=pipe.dtype, scheduler=scheduler, sampler=config.name, steps=request.steps,
                             eta=request.eta, guided=guided, cond=cond)
            out, chunk_bad = self.program(key, config, pipe).serve(request, start, stop, callback, progress)
            outputs.append(out)
            if bad is None and chunk_bad is not None:  # evaluation indices are per chunk; the first chunk's wins
                bad = chunk_bad
        return torch.cat(outputs), bad

    def chunks(self, n: int) -> int:
        """How many bucket runs a request of n samples takes (larger requests run in chunks of the largest)."""
        return -(-n // self.buckets[-1])

    def stats(self) -> dict[str, Any]:
        """Mode, buckets, and per cached Program: its key (described, and batch / sampler / steps / guided), build
        (compile / capture) seconds (None while its first request builds it), bytes (static buffers plus, for
        graphs, the memory the capture reserved in the shared pool) and hits; external modes add "network" (its
        describe(): provider, export folder, build seconds)."""
        with self.lock:
            programs = list(self.programs.values())
            network = self.network.describe() if self.mode in EXTERNAL_MODES and self.network is not None else None
        entries = [{"key": p.key.describe(), "batch": p.key.batch, "sampler": p.key.sampler, "steps": p.key.steps,
                    "guided": p.key.guided, "build_s": p.build_s, "bytes": p.nbytes, "hits": p.hits}
                   for p in programs]  # least recently used first
        stats = {"mode": self.mode, "buckets": list(self.buckets), "max_graphs": self.max_graphs,
                 "compile_loop": self.compile_loop, "entries": entries,
                 "bytes": sum(e["bytes"] for e in entries), "evictions": self.evictions}
        return stats if network is None else {**stats, "network": network}
