"""blitzdiff.load(folder).sample(...) against diffusers' own denoising loops on the same folder.

Tiny random diffusers models are saved as pipeline folders (UNet2D pixel model; UNet2DCondition + VAE, Stable
Diffusion style; DiT with learned sigma + VAE). With the same sampler, step count and initial noise, the Pipeline's
`output_type="raw"` equals the loop diffusers' pipelines run (DDPMPipeline, StableDiffusionPipeline, DiTPipeline:
written out here with their guidance and learned-sigma handling) to 1e-4 relative in float32, with and without
guidance; decoding equals the VAE's decode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import blitzdiff

diffusers = pytest.importorskip("diffusers")

STEPS = 6
RTOL = 1e-4


def _randomize(model, seed: int):
    gen = torch.Generator().manual_seed(seed)  # diffusers zero-initializes some layers; wake them all up
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _save(folder: Path, pipeline_class: str, scheduler, **components) -> Path:
    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(scheduler).__name__]}
    scheduler.save_pretrained(folder / "scheduler")
    for name, model in components.items():
        model.save_pretrained(folder / name)
        index[name] = ["diffusers", type(model).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _vae():
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                   layers_per_block=1, norm_num_groups=4, sample_size=16,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """name -> (pipeline folder, the diffusers components it was saved from)."""
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    cond_unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                               block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                               attention_head_dim=2, cross_attention_dim=8,
                                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    ddim = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    dpm = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    specs = {
        "ddpm": ("DDPMPipeline", ddim, {"unet": _randomize(unet, 0)}),
        "sd": ("StableDiffusionPipeline", dpm, {"unet": _randomize(cond_unet, 1), "vae": _randomize(_vae(), 2)}),
        "dit": ("DiTPipeline", ddim, {"transformer": _randomize(dit, 3), "vae": _randomize(_vae(), 4)}),
    }
    out = {}
    for name, (cls, scheduler, parts) in specs.items():
        folder = _save(tmp_path_factory.mktemp(name), cls, scheduler, **parts)
        # Reloaded from the folder, as a diffusers user has it (its config then lists every field explicitly).
        out[name] = folder, {"scheduler": type(scheduler).from_pretrained(folder / "scheduler"), **parts}
    return out


def noise(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def diffusers_loop(parts: dict, x: torch.Tensor, scheduler_class=None, guidance: float = 1.0, **cond) -> torch.Tensor:
    """The loop of DDPMPipeline / StableDiffusionPipeline / DiTPipeline (guidance and learned sigma included)."""
    scheduler = parts["scheduler"]
    scheduler = scheduler if scheduler_class is None else scheduler_class.from_config(scheduler.config)
    scheduler.set_timesteps(STEPS)
    x = x * scheduler.init_noise_sigma
    guided = guidance != 1.0
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        if "transformer" in parts:  # DiTPipeline: labels [cond, null], guidance on the eps channels, sigma dropped
            model = parts["transformer"]
            labels = cond["class_labels"]
            if guided:
                labels = torch.cat([labels, torch.full_like(labels, model.config.num_embeds_ada_norm)])
            out = model(model_in, timestep=t.expand(model_in.shape[0]), class_labels=labels).sample
            channels = model.config.in_channels
            out = out[:, :channels]
            if guided:
                eps_cond, eps_uncond = out.chunk(2)
                out = eps_uncond + guidance * (eps_cond - eps_uncond)
        elif "encoder_hidden_states" in cond:  # StableDiffusionPipeline: [negative, prompt]
            states = cond["encoder_hidden_states"]
            if guided:
                states = torch.cat([cond["negative"], states])
            out = parts["unet"](model_in, t, encoder_hidden_states=states).sample
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + guidance * (text - uncond)
        else:
            out = parts["unet"](model_in, t).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < RTOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("sampler", [None, "dpmpp_2m", "euler"])
def test_unet2d_pipeline_matches_diffusers(folders, sampler):
    folder, parts = folders["ddpm"]
    pipe = blitzdiff.load(folder)
    x = noise((2, 3, 8, 8))
    ours = pipe.sample(2, steps=STEPS, sampler=sampler, noise=x, output_type="raw", progress=False)
    classes = {None: None, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
               "euler": diffusers.EulerDiscreteScheduler}
    assert_close(ours, diffusers_loop(parts, x, classes[sampler]))


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_stable_diffusion_pipeline_matches_diffusers(folders, guidance):
    folder, parts = folders["sd"]
    pipe = blitzdiff.load(folder)
    gen = torch.Generator().manual_seed(1)
    prompt, negative = torch.randn(2, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    x = noise((2, 4, 8, 8))
    ours = pipe.sample(2, steps=STEPS, noise=x, encoder_hidden_states=prompt,
                       negative_encoder_hidden_states=negative if guidance != 1.0 else None, guidance_scale=guidance,
                       output_type="raw", progress=False)
    theirs = diffusers_loop(parts, x, guidance=guidance, encoder_hidden_states=prompt,
                            negative=negative.expand(2, -1, -1))
    assert_close(ours, theirs)
    images = pipe.sample(2, steps=STEPS, noise=x, encoder_hidden_states=prompt,
                         negative_encoder_hidden_states=negative if guidance != 1.0 else None,
                         guidance_scale=guidance, output_type="tensor", progress=False)
    vae = parts["vae"]
    with torch.no_grad():
        decoded = (vae.decode(theirs / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 3, 16, 16)
    assert (images - decoded).abs().max().item() < 1e-4


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dit_pipeline_matches_diffusers(folders, guidance):
    folder, parts = folders["dit"]
    pipe = blitzdiff.load(folder)
    x, labels = noise((3, 4, 8, 8)), torch.tensor([1, 7, 3])
    ours = pipe.sample(3, steps=STEPS, noise=x, class_labels=labels, guidance_scale=guidance, output_type="raw",
                       progress=False)
    assert_close(ours, diffusers_loop(parts, x, guidance=guidance, class_labels=labels))


def test_dit_guidance_defaults_to_diffusers_4(folders):
    folder, _ = folders["dit"]
    pipe = blitzdiff.load(folder)
    kwargs = dict(steps=2, noise=noise((1, 4, 8, 8)), class_labels=5, output_type="raw", progress=False)
    torch.testing.assert_close(pipe.sample(1, **kwargs), pipe.sample(1, guidance_scale=4.0, **kwargs))


def test_output_types(folders):
    pipe = blitzdiff.load(folders["ddpm"][0])
    kwargs = dict(steps=2, seeds=3, progress=False)
    tensor = pipe.sample(2, output_type="tensor", **kwargs)
    array = pipe.sample(2, output_type="numpy", **kwargs)
    images = pipe.sample(2, output_type="pil", **kwargs)
    assert tensor.shape == (2, 3, 8, 8) and 0 <= tensor.min() and tensor.max() <= 1
    assert array.shape == (2, 8, 8, 3)
    assert torch.equal(torch.from_numpy(array).permute(0, 3, 1, 2), tensor)
    assert len(images) == 2 and images[0].size == (8, 8)


def test_seeds_key_each_sample(folders):
    """Sample i depends on its seed only: its initial noise and its output are the same in any batch (up to the
    network's batch-dependent float32 rounding: matrix products tile differently per batch size)."""
    pipe = blitzdiff.load(folders["dit"][0])
    together = pipe.sample(3, steps=3, seeds=[5, 9, 2], class_labels=[1, 2, 3], output_type="raw", progress=False)
    alone = pipe.sample(1, steps=3, seeds=[9], class_labels=[2], output_type="raw", progress=False)
    assert_close(together[1:2], alone)
    assert (together[0] - together[2]).abs().max() > 0.1


def test_callback_and_progress(folders):
    pipe = blitzdiff.load(folders["ddpm"][0])
    seen = []
    pipe.sample(1, steps=4, sampler="heun", callback=lambda i, t, x: seen.append((i, x.shape)), progress=True)
    assert [i for i, _ in seen] == list(range(7))  # heun: 2 evaluations per step but the last
    assert all(shape == (1, 3, 8, 8) for _, shape in seen)


BAD = {
    "output-type": ("ddpm", {"output_type": "latent"}, r"unknown output_type 'latent'; allowed: pil, numpy"),
    "n": ("ddpm", {"n": 0}, r"n must be an int >= 1, got 0"),
    "noise-shape": ("ddpm", {"noise": torch.zeros(1, 3, 4, 4)}, r"noise must be a tensor of shape \(1, 3, 8, 8\)"),
    "guidance-uncond": ("ddpm", {"guidance_scale": 3.0}, r"needs a conditional model"),
    "labels-missing": ("dit", {}, r"is class-conditional: pass class_labels"),
    "labels-range": ("dit", {"class_labels": [10]}, r"class_labels must be an int or 1 ints in 0..9"),
    "labels-unexpected": ("ddpm", {"class_labels": 1}, r"this model is not class-conditional"),
    "prompt-missing": ("sd", {}, r"needs encoder_hidden_states"),
    "prompt-width": ("sd", {"encoder_hidden_states": torch.zeros(1, 5, 3)}, r"must be a tensor \[n or 1, tokens, 8\]"),
    "negative-missing": ("sd", {"encoder_hidden_states": torch.zeros(1, 5, 8), "guidance_scale": 7.5},
                         r"needs negative_encoder_hidden_states"),
    "height": ("sd", {"encoder_hidden_states": torch.zeros(1, 5, 8), "height": 15}, r"height=15 must be a positive "
               r"multiple of 2"),
    "sampler": ("ddpm", {"sampler": "plms"}, r"unknown sampler 'plms'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_are_clear_errors(folders, case):
    name, kwargs, message = BAD[case]
    pipe = blitzdiff.load(folders[name][0])
    kwargs = {"n": 1, "steps": 2, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.sample(kwargs.pop("n"), **kwargs)


def test_unsupported_scheduler_class_needs_a_sampler(folders, tmp_path):
    folder, parts = folders["ddpm"]
    pndm = tmp_path / "pndm"
    _save(pndm, "DDPMPipeline", diffusers.PNDMScheduler(skip_prk_steps=True), unet=parts["unet"])
    pipe = blitzdiff.load(pndm)
    with pytest.raises(ValueError, match=r"'PNDMScheduler' is not supported; pass sampler="):
        pipe.sample(1, steps=2, progress=False)
    assert pipe.sample(1, steps=2, sampler="ddim", output_type="raw", progress=False).shape == (1, 3, 8, 8)


class Faulty(torch.nn.Module):
    """Wraps a network; returns NaN from evaluation `bad_from` on while its weights are in a half dtype (or always,
    with always=True): what an fp16 overflow looks like to the pipeline."""

    def __init__(self, inner, bad_from: int, always: bool = False):
        super().__init__()
        self.inner, self.bad_from, self.always, self.calls = inner, bad_from, always, 0
        self.config, self.diffusers_class = inner.config, inner.diffusers_class

    def forward(self, x, t, **cond):
        out = self.inner(x, t, **cond)
        self.calls += 1
        half = next(self.parameters()).dtype != torch.float32
        return out * float("nan") if self.calls > self.bad_from and (half or self.always) else out


def test_non_finite_output_is_reported_after_the_loop(folders):
    pipe = blitzdiff.load(folders["ddpm"][0])
    faulty = blitzdiff.Pipeline(Faulty(pipe.model, bad_from=2, always=True), pipe.scheduler_config)
    with pytest.raises(blitzdiff.engine.pipeline.NonFiniteOutput, match=r"NaN or Inf at evaluation 2 \(timestep"):
        faulty.sample(1, steps=4, progress=False)
    with pytest.raises(ValueError, match=r"unknown on_non_finite 'ignore'; allowed: raise, retry"):
        faulty.sample(1, steps=4, progress=False, on_non_finite="ignore")


def test_non_finite_half_network_retries_in_float32(folders):
    pipe = blitzdiff.load(folders["ddpm"][0], dtype=torch.bfloat16)
    faulty = blitzdiff.Pipeline(Faulty(pipe.model, bad_from=1), pipe.scheduler_config)
    with pytest.raises(blitzdiff.engine.pipeline.NonFiniteOutput, match=r"in torch.bfloat16; pass on_non_finite="):
        faulty.sample(1, steps=3, seeds=1, progress=False, output_type="raw")
    out = faulty.sample(1, steps=3, seeds=1, progress=False, output_type="raw", on_non_finite="retry")
    reference = blitzdiff.load(folders["ddpm"][0]).sample(1, steps=3, seeds=1, progress=False, output_type="raw")
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    # The retry ran a float32 copy of the bf16-rounded weights: the float32 model's result up to that rounding
    # (2^-8 relative per weight; 3e-3 measured), and nowhere near NaN.
    assert ((out - reference).abs().max() / reference.abs().max()).item() < 2e-2
