"""CPU graphs (blitzdiff.engine.cpu_graph): a replayed forward equals the eager one bit for bit, on every model
class and sampler kind; what cannot be replayed stays eager, and a capture that missed a call is caught."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blitzdiff
from blitzdiff.engine import cpu_graph
from blitzdiff.engine.cpu_graph import CaptureRefused, CpuGraph, CpuGraphs, same_bits
from blitzdiff.engine.network import NonFiniteOutput
from blitzdiff.models import set_backend
from blitzdiff.models.conv import Conv2d, onednn_available
from blitzdiff.models.registry import model_class

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
             "clip_sample": False, "timestep_spacing": "trailing"}
CONFIGS = {
    "UNet2DModel": {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": (16, 32),
                    "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8,
                    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                    "up_block_types": ("AttnUpBlock2D", "UpBlock2D")},
    "UNet2DConditionModel": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
                             "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
                             "cross_attention_dim": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
    "DiTTransformer2DModel": {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
                              "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10},
}


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    """Random weights everywhere (nothing zero-initialized), channels-last on the "auto" kernels: the default
    CPU path blitzdiff.load gives."""
    model = model_class(name).from_config(CONFIGS[name])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return set_backend(model.eval().to(memory_format=torch.channels_last), "auto")


def inputs(name: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    channels = CONFIGS[name]["in_channels"]
    out = {"sample": torch.randn(batch, channels, 8, 8, generator=gen),
           "timestep": torch.tensor([10, 900, 500, 250][:batch])}
    if name == "UNet2DConditionModel":
        out["encoder_hidden_states"] = torch.randn(batch, 3, 8, generator=gen)
    if name == "DiTTransformer2DModel":
        out["class_labels"] = torch.tensor([1, 3, 5, 7][:batch])
    return out


def graphed(name: str, **options) -> tuple[nn.Module, CpuGraphs, dict[str, torch.Tensor]]:
    """A tiny model of class `name`, its CpuGraphs and one set of inputs."""
    model = tiny_model(name)
    return model, CpuGraphs(model, **options), inputs(name)


def call(fn, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return fn(x["sample"], x["timestep"], **{k: v for k, v in x.items() if k not in ("sample", "timestep")})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_replays_equal_the_eager_forward_bitwise_on_new_inputs(name):
    model = tiny_model(name)
    graphs = CpuGraphs(model)
    with torch.no_grad():
        for seed in (1, 2, 3):  # the first call captures, the others replay
            x = inputs(name, seed=seed)
            got = call(graphs, x)
            assert torch.equal(got, call(model, x))
    (entry,) = graphs.stats()
    assert "refused" not in entry and entry["steps"] > 10, entry


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc", "heun", "ddpm", "dpmpp_3m_sde"])
def test_pipeline_samples_equal_the_eager_loop_bitwise(sampler):
    pipe = blitzdiff.Pipeline(tiny_model("DiTTransformer2DModel"), SCHEDULER, name="tiny")
    kwargs = {"steps": 5, "sampler": sampler, "seeds": [3, 4, 5], "class_labels": [1, 2, 3], "output_type": "raw",
              "progress": False, "guidance_scale": 2.0}
    graphed = pipe.sample(3, **kwargs)
    assert pipe.cpu_graphs.stats() and all("refused" not in s for s in pipe.cpu_graphs.stats())
    graphs, pipe.cpu_graphs = pipe.cpu_graphs, None
    assert torch.equal(graphed, pipe.sample(3, **kwargs))
    pipe.cpu_graphs = graphs


def test_the_embedded_default_models_are_replayed():
    for name in ("unet-digits", "dit-digits"):
        pipe = blitzdiff.load(name)
        kwargs = {"class_labels": [4]} if pipe.kind.class_conditional else {}
        graphed = pipe.sample(1, steps=3, seeds=0, output_type="raw", progress=False, **kwargs)
        (entry,) = pipe.cpu_graphs.stats()
        assert "refused" not in entry, entry
        pipe.cpu_graphs = None
        assert torch.equal(graphed, pipe.sample(1, steps=3, seeds=0, output_type="raw", progress=False, **kwargs))


def test_a_capture_that_missed_a_kernel_call_is_refused(monkeypatch):
    """The proof step at work: each recording drops its first direct kernel call (a stale buffer on replay)."""
    name = "UNet2DModel"
    model = tiny_model(name)
    native = cpu_graph._Recorder.native
    dropped = []  # the recorders that dropped one

    def forgetful(self, kernel, args, keep):
        if self.depth == 0 and not any(recorder is self for recorder in dropped):
            dropped.append(self)
            return
        native(self, kernel, args, keep)

    monkeypatch.setattr(cpu_graph._Recorder, "native", forgetful)
    with torch.no_grad(), pytest.raises(CaptureRefused, match="differs from the eager forward"):
        CpuGraph(model, inputs(name), max_bytes=2**30)
    assert dropped
    dropped.clear()
    graphs = CpuGraphs(model)
    with torch.no_grad():
        x = inputs(name)
        assert torch.equal(call(graphs, x), call(model, x))  # refused: eager
    assert "differs" in graphs.stats()[0]["refused"]


class _Branchy(nn.Module):
    """A forward that decides from a tensor value in Python: not replayable."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, sample, timestep):
        y = self.proj(sample)
        return y * 2 if bool(timestep[0] > 500) else y


class _Pointwise(nn.Module):
    """A 1x1 convolution above DIRECT_MAX_MACS: prepacked oneDNN, whose packed weight has no storage."""

    def __init__(self):
        super().__init__()
        self.conv = Conv2d(256, 256, 1)
        self.conv.backend = "auto"

    def forward(self, sample, timestep):
        return self.conv(sample) * timestep[:, None, None, None]


class _InPlace(nn.Module):
    """In-place calls the capture must make again: inplace=True, +=, item assignment."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, sample, timestep):
        y = F.relu(self.proj(sample), inplace=True)
        y += timestep[:, None].float()
        y[:, 0] = sample[:, 1]
        return y


def test_a_network_returning_nan_is_replayed_and_reported():
    """The proof compares bits, NaNs included; the loop's NaN guard then sees the replayed NaNs."""
    model = tiny_model("DiTTransformer2DModel")
    with torch.no_grad():
        model.proj_out_2.bias[0] = float("nan")
    pipe = blitzdiff.Pipeline(model, SCHEDULER, name="tiny")
    with pytest.raises(NonFiniteOutput, match=r"NaN or Inf at evaluation 0 \(timestep"):
        pipe.sample(2, steps=3, class_labels=[1, 2], progress=False)
    (entry,) = pipe.cpu_graphs.stats()
    assert "steps" in entry, entry
    x = inputs("DiTTransformer2DModel")
    with torch.no_grad():
        assert same_bits(call(pipe.cpu_graphs, x), call(model, x))


def test_same_bits_tells_nans_and_signed_zeros_apart():
    a = torch.tensor([1.0, float("nan"), 0.0])
    assert same_bits(a, a.clone()) and not torch.equal(a, a.clone())
    assert not same_bits(a, torch.tensor([1.0, float("nan"), -0.0]))
    assert not same_bits(a, a.double()) and same_bits(torch.arange(3), torch.arange(3))


def test_a_forward_reading_values_on_the_host_stays_eager():
    model = _Branchy().eval()
    graphs = CpuGraphs(model)
    with torch.no_grad():
        for t in (100, 900, 100):
            x = {"sample": torch.randn(2, 4), "timestep": torch.tensor([t, t])}
            assert torch.equal(call(graphs, x), call(model, x))
    assert "reads tensor values on the host (__bool__" in graphs.stats()[0]["refused"]


def test_in_place_calls_are_replayed():
    model = _InPlace().eval()
    graphs = CpuGraphs(model)
    with torch.no_grad():
        for seed in (0, 1, 2):
            gen = torch.Generator().manual_seed(seed)
            x = {"sample": torch.randn(2, 4, generator=gen), "timestep": torch.randint(0, 1000, (2,), generator=gen)}
            assert torch.equal(call(graphs, x), call(model, x))
    assert graphs.stats()[0]["steps"] >= 4  # linear, relu_, add_, __setitem__


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
def test_prepacked_onednn_convolutions_are_replayed():
    model = _Pointwise().eval().to(memory_format=torch.channels_last)
    graphs = CpuGraphs(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            x = {"sample": torch.randn(2, 256, 16, 16, generator=gen).to(memory_format=torch.channels_last),
                 "timestep": torch.rand(2, generator=gen)}
            assert torch.equal(call(graphs, x), call(model, x))
    assert model.conv.prepacked.plan[1] == "onednn" and "steps" in graphs.stats()[0], graphs.stats()


def test_changed_weights_and_backends_are_captured_again():
    model, graphs, x = graphed("DiTTransformer2DModel")
    with torch.no_grad():
        before = call(graphs, x)
        model.proj_out_2.weight.mul_(2.0)  # in place: a version counter moves
        after = call(graphs, x)
        assert not torch.equal(after, before) and torch.equal(after, call(model, x))
        set_backend(model, "ref")  # the spec's ops instead of the kernels
        assert torch.equal(call(graphs, x), call(model, x))
        model.to(memory_format=torch.contiguous_format)  # new parameter memory
        assert torch.equal(call(graphs, x), call(model, x))


@pytest.mark.parametrize("runtime", [False, True])
def test_a_sampling_run_checks_each_graph_once_and_the_next_run_sees_changes(monkeypatch, runtime):
    """pipe.sample (and each request of compile("eager")) checks a layout's graph against the network on its first
    call only (CpuGraphs.run); a weight changed in place between two runs is replayed with its new values."""
    pipe = blitzdiff.Pipeline(tiny_model("DiTTransformer2DModel"), SCHEDULER, name="tiny")
    if runtime:
        pipe.compile("eager", buckets=(2,))
    kwargs = {"steps": 4, "sampler": "dpmpp_2m", "seeds": [3, 4], "class_labels": [1, 2], "output_type": "raw",
              "progress": False}
    pipe.sample(2, **kwargs)  # captures
    checks, captures = [], []
    current, capture = CpuGraph.current, CpuGraphs._capture
    monkeypatch.setattr(CpuGraph, "current", lambda graph: checks.append(graph) or current(graph))
    monkeypatch.setattr(CpuGraphs, "_capture", lambda graphs, *args: captures.append(args) or capture(graphs, *args))
    pipe.sample(2, **kwargs)
    assert len(checks) == 1 and not captures  # 4 network calls, one layout (guided: both halves in one call)
    with torch.no_grad():
        pipe.model.proj_out_2.weight.mul_(2.0)  # in place: the version counter moves
    changed = pipe.sample(2, **kwargs)
    assert len(checks) == 2 and len(captures) == 1
    graphs, pipe.cpu_graphs = pipe.cpu_graphs, None
    if runtime:
        pipe.compile("eager", buckets=(2,))  # a runtime network without the graphs
    assert torch.equal(changed, pipe.sample(2, **kwargs))
    pipe.cpu_graphs = graphs


def test_buffers_past_max_bytes_refuse_the_capture():
    model, graphs, x = graphed("UNet2DModel", max_bytes=4096)
    with torch.no_grad():
        assert torch.equal(call(graphs, x), call(model, x))
    assert "more than max_bytes (4096 bytes)" in graphs.stats()[0]["refused"]


def test_the_graphs_together_stay_within_max_bytes():
    model, graphs, x = graphed("UNet2DModel")
    with torch.no_grad():
        call(graphs, x)
        one = graphs.bytes()
        graphs.max_bytes = 12 * one // 5  # buffers grow with the batch: batches 1 and 3 fit, with 2 they do not
        for batch in (1, 3):
            call(graphs, inputs("UNet2DModel", batch, seed=batch))
    assert [s["shapes"]["sample"][0] for s in graphs.stats()] == [1, 3] and graphs.bytes() <= graphs.max_bytes


@pytest.mark.parametrize(("options", "message"), [({"max_graphs": 0}, "max_graphs must be an int >= 1, got 0"),
                                                  ({"max_bytes": 1.5}, "max_bytes must be an int >= 1, got 1.5")])
def test_bad_limits_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        CpuGraphs(nn.Linear(2, 2), **options)


def test_profiler_and_gradients_see_the_eager_forward():
    model, graphs, x = graphed("UNet2DModel")
    with torch.no_grad(), torch.profiler.profile() as prof:
        call(graphs, x)
    assert not graphs.graphs and any(e.name.startswith("blitzdiff::conv2d") for e in prof.events())
    call(graphs, x)  # grad mode on
    assert not graphs.graphs


def test_layouts_and_thread_counts_have_their_own_graphs_and_the_oldest_goes():
    name = "DiTTransformer2DModel"
    model = tiny_model(name)
    graphs = CpuGraphs(model, max_graphs=2)
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1
    try:
        with torch.no_grad():
            for batch, count in ((1, threads), (2, threads), (2, other)):
                torch.set_num_threads(count)
                x = inputs(name, batch)
                assert torch.equal(call(graphs, x), call(model, x))
    finally:
        torch.set_num_threads(threads)
    assert [(s["threads"], s["shapes"]["sample"][0]) for s in graphs.stats()] == [(threads, 2), (other, 2)]


def test_inference_mode_and_autocast_have_their_own_graphs():
    model, graphs, x = graphed("UNet2DModel")
    with torch.inference_mode():
        assert torch.equal(call(graphs, x), call(model, x))
    with torch.no_grad():  # the inference-mode graph's buffers could not be written here
        assert torch.equal(call(graphs, x), call(model, x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(call(graphs, x), call(model, x))
    assert len(graphs.stats()) == 3 and all("steps" in entry for entry in graphs.stats()), graphs.stats()


def test_the_eager_runtime_replays_the_same_graphs():
    pipe = blitzdiff.Pipeline(tiny_model("DiTTransformer2DModel"), SCHEDULER, name="tiny")
    kwargs = {"steps": 4, "sampler": "dpmpp_2m", "seeds": [3, 4], "class_labels": [1, 2], "output_type": "raw",
              "progress": False}
    expected = pipe.sample(2, **kwargs)
    pipe.cpu_graphs.clear()
    pipe.compile("eager", buckets=(2,))
    assert torch.equal(pipe.sample(2, **kwargs), expected)
    assert [s["shapes"]["sample"][0] for s in pipe.cpu_graphs.stats()] == [4]  # guided: uncond and cond rows


def test_concurrent_callers_each_get_their_own_result():
    name = "UNet2DModel"
    model = tiny_model(name)
    graphs = CpuGraphs(model)
    batches = [inputs(name, seed=seed) for seed in range(6)]
    with torch.no_grad():
        expected = [call(model, x) for x in batches]
        results: dict[int, torch.Tensor] = {}

        def work(i: int) -> None:
            with torch.no_grad():
                for _ in range(3):
                    results[i] = call(graphs, batches[i])

        workers = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(len(batches)))
