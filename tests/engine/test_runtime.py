"""Pipeline.compile: buckets, static buffers, the LRU cache, weight refresh, torch.compile; CUDA graphs on a GPU.

The reference is always the plain eager Pipeline (no compile()) on the same inputs. Bucketed runs pad the batch;
the padding must never reach a real sample (checked with NaN padding) and a new seed, label or guidance scale must
reuse the built entry.
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import blitzdiff
from blitzdiff.engine.network import NonFiniteOutput
from blitzdiff.engine.runtime import Request, choose_bucket
from blitzdiff.models.registry import model_class

CUDA = pytest.mark.cuda
SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
             "clip_sample": False, "timestep_spacing": "trailing"}
TINY = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 2,
        "out_channels": 4, "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 5}


def tiny_model(seed: int = 0, device: str = "cpu", config: dict = TINY) -> torch.nn.Module:
    """A class-conditional DiT with learned sigma and random weights (nothing zero-initialized)."""
    model = model_class("DiTTransformer2DModel").from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval().to(device)


def tiny_pipeline(seed: int = 0, device: str = "cpu") -> blitzdiff.Pipeline:
    return blitzdiff.Pipeline(tiny_model(seed, device), SCHEDULER, name="tiny")


def run(pipe, n: int, **kwargs) -> torch.Tensor:
    kwargs = {"steps": 4, "sampler": "dpmpp_2m", "seeds": 7, "class_labels": [i % 5 for i in range(n)],
              "output_type": "raw", "progress": False, **kwargs}
    return pipe.sample(n, **kwargs)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_bucket_choice():
    assert [choose_bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]


@pytest.mark.parametrize("n", [3, 6])
def test_bucketed_eager_equals_the_plain_loop(n):
    # n=3 runs padded in bucket 4; n=6 in chunks of the largest bucket (4) then 2.
    plain = run(tiny_pipeline(), n, guidance_scale=1.5)
    pipe = tiny_pipeline().compile("eager", buckets=(2, 4))
    out = run(pipe, n, guidance_scale=1.5)
    assert out.shape == plain.shape and relative(out, plain) < 1e-5
    batches = sorted(e["batch"] for e in pipe.runtime_stats()["entries"])
    assert batches == ([4] if n == 3 else [2, 4])


def test_padding_never_reaches_a_real_sample():
    pipe = tiny_pipeline().compile("eager", buckets=(4,))
    expected = run(pipe, 3, guidance_scale=2.0)
    program = next(iter(pipe.runtime.programs.values()))
    cond = {"class_labels": torch.tensor([0, 1, 2])}
    request = Request(pipe.initial_noise(torch.tensor([7, 8, 9]), (2, 8, 8)), torch.tensor([7, 8, 9]), cond,
                      {"class_labels": torch.full((3,), 5)}, 2.0, 4, "dpmpp_2m", None)
    with torch.inference_mode():  # as Pipeline.sample runs it (the buffers are inference tensors)
        program.load(request, 0, 3)
        program.noise[3:] = float("nan")  # poison the padding row
        program.denoiser.cond["class_labels"][7] = 4  # and its cond label
        out, flags, _ = program.run(None, None, 3)
    assert torch.equal(out[:3], expected) and torch.isnan(out[3]).all()
    assert not flags.all() and flags.reshape(flags.shape[0], 2, 4)[:, :, :3].all()  # NaN only in padding rows


def test_new_inputs_reuse_the_entry():
    pipe = tiny_pipeline().compile("eager", buckets=(4,))
    reference = tiny_pipeline()
    for seeds, labels, scale in ((0, [1, 2, 3], 2.0), (5, [4, 4, 0], 3.5), (9, [2, 0, 1], 1.25)):
        out = run(pipe, 3, seeds=seeds, class_labels=labels, guidance_scale=scale)
        assert relative(out, run(reference, 3, seeds=seeds, class_labels=labels, guidance_scale=scale)) < 1e-5
    (entry,) = pipe.runtime_stats()["entries"]
    assert entry["hits"] == 3 and "guided" in entry["key"]


def test_lru_cache_is_bounded_and_evicts_the_least_recently_used():
    pipe = tiny_pipeline().compile("eager", buckets=(1, 2, 4), max_graphs=2)
    for steps in (2, 3, 2, 4):  # 2 is used again before 4 arrives: 3, not the older 2, must go
        run(pipe, 1, steps=steps)
    stats = pipe.runtime_stats()
    assert stats["evictions"] == 1 and [e["steps"] for e in stats["entries"]] == [2, 4]
    assert [e["hits"] for e in stats["entries"]] == [2, 1]


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("mode", [None, "eager"])
def test_repeated_calls_hold_no_memory(mode):
    pipe = tiny_pipeline()
    if mode is not None:
        pipe.compile(mode, buckets=(4,))
    for _ in range(3):  # warm-up: the entry, allocator caches
        run(pipe, 3, sampler="euler_ancestral")
    tensors, rss = live_tensors(), rss_bytes()
    for _ in range(100):
        run(pipe, 3, sampler="euler_ancestral")
    # no tensor outlives its call (e.g. per-evaluation flags kept across runs). Not ==: an earlier test's tensors
    # may be released meanwhile (seen after tests/test_profiling.py and test_threads.py were collected: -4 to -6)
    assert live_tensors() <= tensors
    assert rss_bytes() - rss < 32 * 2**20


def test_evicted_entries_are_released():
    pipe = tiny_pipeline().compile("eager", buckets=(4,), max_graphs=1)
    run(pipe, 3, steps=2)
    first = weakref.ref(pipe.runtime.programs[next(iter(pipe.runtime.programs))])
    run(pipe, 3, steps=3)  # evicts the first entry
    gc.collect()
    assert first() is None and pipe.runtime_stats()["evictions"] == 1


def _save_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", **model.config}))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_load_weights_refreshes_in_place_and_replacing_the_model_rebuilds(tmp_path):
    pipe = tiny_pipeline(seed=0).compile("eager", buckets=(4,))
    before = run(pipe, 2)
    pipe.load_weights(_save_checkpoint(tiny_model(seed=1), tmp_path / "other"))
    after = run(pipe, 2)
    assert relative(after, run(tiny_pipeline(seed=1), 2)) < 1e-5 and relative(after, before) > 1e-2
    assert pipe.runtime_stats()["entries"][0]["hits"] == 2  # same entry: the weights were copied in place
    pipe.model = tiny_model(seed=0)  # a new model object: every entry is dropped and rebuilt
    assert relative(run(pipe, 2), before) < 1e-5 and pipe.runtime_stats()["entries"][0]["hits"] == 1
    with pytest.raises(ValueError, match="config differs from the loaded DiTTransformer2DModel's; load it as a new"):
        pipe.load_weights(_save_checkpoint(tiny_model(config=dict(TINY, num_layers=1)), tmp_path / "wrong"))


def test_half_network_keeps_a_float32_state():
    pipe = blitzdiff.Pipeline(tiny_model().to(torch.bfloat16), SCHEDULER).compile("eager", buckets=(2,))
    out = run(pipe, 2)
    assert out.dtype == torch.float32 and relative(out, run(tiny_pipeline(), 2)) < 5e-2


class NaNAfter(torch.nn.Module):
    """Wraps a model; from call `bad_from` on, its outputs are NaN."""

    def __init__(self, inner: torch.nn.Module, bad_from: int):
        super().__init__()
        self.inner, self.bad_from, self.calls = inner, bad_from, 0
        self.config, self.diffusers_class = inner.config, inner.diffusers_class

    def forward(self, x, t, **cond):
        self.calls += 1
        out = self.inner(x, t, **cond)
        return out * float("nan") if self.calls > self.bad_from else out


class NaNWhereZero(torch.nn.Module):
    """Wraps a model; rows whose input is all zero (bucket padding: zero noise) come out NaN."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.config, self.diffusers_class = inner, inner.config, inner.diffusers_class

    def forward(self, x, t, **cond):
        zero = (x.flatten(1) == 0).all(1).reshape(-1, *[1] * (x.dim() - 1))
        return self.inner(x, t, **cond).masked_fill(zero, float("nan"))


def test_non_finite_padding_does_not_fail_real_samples():
    pipe = blitzdiff.Pipeline(NaNWhereZero(tiny_model()), SCHEDULER).compile("eager", buckets=(4,))
    out = run(pipe, 3, guidance_scale=2.0)  # padding row 3 is NaN at every evaluation; rows 0-2 are not
    assert torch.isfinite(out).all() and relative(out, run(tiny_pipeline(), 3, guidance_scale=2.0)) < 1e-5
    with pytest.raises(NonFiniteOutput, match="evaluation 0"):  # a real all-zero input row is reported
        run(pipe, 3, noise=torch.zeros(3, 2, 8, 8))


def test_non_finite_guard_through_the_runtime():
    pipe = blitzdiff.Pipeline(NaNAfter(tiny_model(), bad_from=2), SCHEDULER)
    pipe.cpu_graphs = None  # NaNAfter counts its calls in Python: one eager forward per evaluation
    pipe.compile("eager", buckets=(4,))
    with pytest.raises(NonFiniteOutput, match=r"NaN or Inf at evaluation 2 \(timestep"):
        run(pipe, 3)


def test_compile_mode_matches_eager():
    reference = run(tiny_pipeline(), 3, guidance_scale=2.0)
    pipe = tiny_pipeline().compile("compile", buckets=(4,))
    assert relative(run(pipe, 3, guidance_scale=2.0), reference) < 1e-4
    assert relative(run(pipe, 3, guidance_scale=2.0, seeds=1), run(tiny_pipeline(), 3, guidance_scale=2.0,
                                                                      seeds=1)) < 1e-4
    (entry,) = pipe.runtime_stats()["entries"]
    assert entry["hits"] == 2 and entry["build_s"] > 0


def test_channels_last_weights_match_eager():
    reference = run(tiny_pipeline(), 3, guidance_scale=2.0)
    pipe = tiny_pipeline().compile("eager", buckets=(4,), channels_last=True)
    weights = [p for p in pipe.model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert relative(run(pipe, 3, guidance_scale=2.0), reference) < 1e-5


def test_compile_loop_matches_eager(capsys):
    reference = run(tiny_pipeline(), 2, steps=2)
    pipe = tiny_pipeline().compile("compile", buckets=(2,), compile_loop=True)
    assert relative(run(pipe, 2, steps=2), reference) < 1e-4
    capsys.readouterr()
    run(pipe, 3, steps=2, progress=True)  # two chunks of bucket 2; the bar is counted outside the compiled loop
    assert "4/4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a callback needs the loop to stop between steps"):
        run(pipe, 2, steps=2, callback=lambda *args: None)


def test_compiled_loops_past_dynamos_recompile_limit():
    # every Program's loop is one more compiled entry of the same code object (Program._loop): with torch's limit
    # at 2 here (8 by default), a third Program's fullgraph compile would fail without the runtime's own limit
    pipe = tiny_pipeline().compile("compile", buckets=(1,), compile_loop=True)
    with torch._dynamo.config.patch(recompile_limit=2):
        for steps in (1, 2, 3):
            assert relative(run(pipe, 1, steps=steps), run(tiny_pipeline(), 1, steps=steps)) < 1e-4, steps


def test_bad_options_are_refused():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"unknown mode 'fast'; allowed: eager, compile, step, graph"):
        pipe.compile("fast")
    with pytest.raises(ValueError, match="needs the pipeline on a CUDA device, not cpu; on CPU use 'compile'"):
        pipe.compile("graph")
    with pytest.raises(ValueError, match=r"buckets must be a non-empty sequence of ints >= 1, got \(0, 2\)"):
        pipe.compile("eager", buckets=(0, 2))
    with pytest.raises(ValueError, match="compile_loop=True needs mode='compile'"):
        pipe.compile("eager", compile_loop=True)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"max_graphs must be an int >= 1, got {bad}"):
            pipe.compile("eager", max_graphs=bad)


@pytest.mark.parametrize("mode", [None, "eager"])
def test_progress_bar_counts_every_evaluation(mode, capsys):
    pipe = tiny_pipeline() if mode is None else tiny_pipeline().compile(mode, buckets=(4,))
    run(pipe, 6, steps=3, sampler="heun", progress=True)  # heun: 5 evaluations; the runtime runs 6 as 4 + 2
    total = 5 if mode is None else 10
    assert f"{total}/{total}" in capsys.readouterr().err  # the finished bar stays on screen


def test_callback_in_bucketed_eager_sees_every_evaluation():
    seen = []
    run(tiny_pipeline().compile("eager", buckets=(4,)), 3, callback=lambda i, t, x: seen.append((i, tuple(x.shape))))
    assert seen == [(i, (8, 2, 8, 8)) for i in range(4)]  # guided (4.0, the DiT default): [uncond; cond] of bucket 4


def test_step_parts_in_order_equal_the_whole_loop():
    # What step mode captures, one graph per part, run here without capture: the parts must chain into the loop.
    pipe = tiny_pipeline().compile("eager", buckets=(4,))
    whole = run(pipe, 3, steps=3, sampler="heun")  # heun: stages without an update, and a point combination
    program = next(iter(pipe.runtime.programs.values()))
    with torch.inference_mode():
        results = [part() for part in program._stage_parts()]
    assert len(results) == len(program.plan.stages) == 5 and all(done is None for _, done in results[:-1])
    out, flags, timesteps = results[-1][1]
    assert torch.equal(out[:3], whole) and flags.shape == (5, 8) and timesteps.shape == (5,)
    assert torch.equal(results[-1][0], program.stage_state["run"].x)


# -- CUDA graphs (need a GPU) ---------------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("mode", ["graph", "step"])
def test_graph_replay_equals_the_eager_loop(mode):
    reference = run(tiny_pipeline(device="cuda"), 3, guidance_scale=2.0)
    pipe = tiny_pipeline(device="cuda").compile(mode, buckets=(4,))
    assert relative(run(pipe, 3, guidance_scale=2.0), reference) < 1e-5
    for seeds, labels, scale in ((3, [4, 0, 1], 3.0), (11, [1, 1, 1], 1.5)):  # copied into the buffers, no capture
        expected = run(tiny_pipeline(device="cuda"), 3, seeds=seeds, class_labels=labels, guidance_scale=scale)
        assert relative(run(pipe, 3, seeds=seeds, class_labels=labels, guidance_scale=scale), expected) < 1e-5
    (entry,) = pipe.runtime_stats()["entries"]
    assert entry["hits"] == 3 and entry["bytes"] > 0
    chunked = run(pipe, 6, guidance_scale=2.0)  # two chunks: 4 in the built entry, then 2 padded to 4
    assert relative(chunked, run(tiny_pipeline(device="cuda"), 6, guidance_scale=2.0)) < 1e-5
    assert pipe.runtime_stats()["entries"][0]["hits"] == 5


@CUDA
def test_evicted_graphs_release_their_memory():
    pipe = tiny_pipeline(device="cuda").compile("graph", buckets=(4,), max_graphs=1)
    run(pipe, 3, steps=2)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for steps in (3, 4, 5, 2, 3):  # every call evicts the previous entry
        run(pipe, 3, steps=steps)
    torch.cuda.synchronize()
    # What may stay: each new step count's plan keeps its small tables on the device (Plan.memo, a few 512-byte
    # blocks); an evicted graph's pool, or a new stream's cuBLAS workspace (32 MiB), would be far more.
    assert pipe.runtime_stats()["evictions"] == 5 and torch.cuda.memory_allocated() - baseline < 64 * 1024


@CUDA
def test_step_graphs_call_back_between_steps():
    seen = []
    pipe = tiny_pipeline(device="cuda").compile("step", buckets=(4,))
    out = run(pipe, 3, callback=lambda k, t, x: seen.append((k, x.clone())))
    assert [k for k, _ in seen] == [0, 1, 2, 3] and seen[-1][1].shape == (3, 2, 8, 8)
    assert torch.equal(seen[-1][1], out)  # dpmpp_2m on a VP state: the final state is the sample


@CUDA
def test_graphs_see_in_place_weight_updates_and_evict(tmp_path):
    pipe = tiny_pipeline(seed=0, device="cuda").compile("graph", buckets=(1, 2), max_graphs=1)
    run(pipe, 2)
    pipe.load_weights(_save_checkpoint(tiny_model(seed=1), tmp_path / "other"))
    assert relative(run(pipe, 2), run(tiny_pipeline(seed=1, device="cuda"), 2)) < 1e-5
    run(pipe, 1)
    assert pipe.runtime_stats()["evictions"] == 1 and len(pipe.runtime_stats()["entries"]) == 1


def test_fused_stages_where_the_loop_runs_in_python(monkeypatch):
    """Eager (and 'compile', whose loop is Python) runs the fused solver stages; a compiled whole loop keeps the
    plain ops, which inductor fuses itself (engine.fused_step). Both equal the plain Pipeline."""
    calls = []
    fused = blitzdiff.engine.sampler.run_fused

    def counted(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(blitzdiff.engine.sampler, "run_fused", counted)
    reference = run(tiny_pipeline(), 2, steps=2, guidance_scale=2.0)
    assert len(calls) == 2  # the plain Pipeline too: two dpmpp_2m stages
    eager = tiny_pipeline().compile("eager", buckets=(2,))
    assert relative(run(eager, 2, steps=2, guidance_scale=2.0), reference) < 1e-5 and len(calls) == 4
    whole = tiny_pipeline().compile("compile", buckets=(2,), compile_loop=True)
    assert relative(run(whole, 2, steps=2, guidance_scale=2.0), reference) < 1e-4 and len(calls) == 4
