"""One guidance scale per sample (Pipeline.sample(guidance_scale=[...]), blitzdiff.sample with a [B] tensor): each row
is guided by its own scale, as if sampled alone with it. The reference is each row's own run with a plain number."""

from __future__ import annotations

import pytest
import torch

import blitzdiff

from .test_runtime import SCHEDULER, relative, run, tiny_model, tiny_pipeline

SCALES = [1.5, 1.0, 4.0]  # 1.0 among guided rows: uncond + 1 * (cond - uncond), the conditional prediction


def solo(pipe, row: int, scales: list[float] = SCALES) -> torch.Tensor:
    """Row `row` of the 3-sample run, sampled alone with its own seed, label and scale."""
    return run(pipe, 1, seeds=7 + row, class_labels=[row], guidance_scale=scales[row])


def test_each_row_is_guided_by_its_own_scale():
    pipe = tiny_pipeline()
    together = run(pipe, 3, guidance_scale=SCALES)
    for row in range(3):
        assert relative(together[row:row + 1], solo(pipe, row)) < 1e-5, row
    mixed = run(pipe, 3, guidance_scale=[4.0, 1.0, 4.0])  # another scale for row 0 changes that row only
    assert relative(mixed[0:1], together[0:1]) > 1e-2 and relative(mixed[1:], together[1:]) < 1e-5


def test_a_uniform_list_runs_exactly_as_its_number():
    pipe = tiny_pipeline()
    assert torch.equal(run(pipe, 3, guidance_scale=[2.0, 2.0, 2.0]), run(pipe, 3, guidance_scale=2.0))


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_in_a_fixed_bucket_a_row_is_bitwise_its_solo_run(mode):
    # all guided: a row at 1.0 alone runs unguided (one network call), which is equal only to float tolerance
    scales = [1.5, 2.5, 4.0]
    pipe = tiny_pipeline().compile(mode, buckets=(4,))
    together = run(pipe, 3, guidance_scale=scales)
    for row in range(3):
        assert torch.equal(together[row:row + 1], solo(pipe, row, scales)), row  # same bucket, other batch-mates
    plain = run(tiny_pipeline(), 3, guidance_scale=scales)
    assert relative(together, plain) < 1e-5
    assert [entry["hits"] for entry in pipe.runtime.stats()["entries"]] == [4]  # new scales: no new entry


def test_functional_sample_takes_a_tensor_of_scales():
    model = tiny_model()
    pipe = blitzdiff.Pipeline(model, SCHEDULER)
    noise = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])

    def fn(x, t, class_labels):
        return model(x, t, class_labels=class_labels)[:, :2]

    got = blitzdiff.sample(fn, noise, steps=4, sampler="dpmpp_2m", scheduler_config=SCHEDULER,
                           guidance_scale=torch.tensor(SCALES), cond={"class_labels": labels},
                           uncond={"class_labels": torch.full_like(labels, 5)}, seeds=7)
    expected = pipe.sample(3, steps=4, sampler="dpmpp_2m", noise=noise, seeds=7, class_labels=labels,
                           guidance_scale=SCALES, output_type="raw", progress=False)
    assert relative(got, expected) < 1e-6


@pytest.mark.parametrize(("scale", "message"), [
    ([1.5, 2.0], r"guidance_scale must be a finite number or 3 of them \(one per sample\), got \[1.5, 2.0\]"),
    ([1.5, float("nan"), 2.0], r"guidance_scale\[1\] must be a finite number, got nan"),
    ("2", "guidance_scale must be a finite number or 3 of them"),
    ([1.5, True, 2.0], r"guidance_scale\[1\] must be a finite number, got True"),
])
def test_bad_scales_are_refused(scale, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_pipeline(), 3, guidance_scale=scale)


def test_an_unconditional_model_refuses_per_sample_guidance():
    config = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
              "block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4,
              "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}
    from blitzdiff.models.registry import model_class

    pipe = blitzdiff.Pipeline(model_class("UNet2DModel").from_config(config), SCHEDULER)
    with pytest.raises(ValueError, match="needs a conditional model; this one is unconditional"):
        pipe.sample(2, steps=2, guidance_scale=[1.5, 2.0], progress=False)
