"""blitzdiff.load(folder).sample(...) against diffusers' own denoising loops on the same folder.

Tiny random diffusers models are saved as pipeline folders (UNet2D pixel model; UNet2DCondition + VAE, Stable
Diffusion style; DiT with learned sigma + VAE) and one bare model folder (a grayscale UNet2D). With the same sampler,
step count and initial noise, the Pipeline's `output_type="raw"` equals the loop diffusers' pipelines run
(DDPMPipeline, StableDiffusionPipeline, DiTPipeline: written out here with their guidance and learned-sigma
handling) to 1e-4 relative in float32, with and without guidance, and with load()'s scheduler_config, vae and
sample()'s height / width; decoding equals the diffusers VAE's decode; PIL images hold the numpy output's pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import blitzdiff
import blitzdiff.engine.sampler
from blitzdiff.engine.config import resolve
from blitzdiff.engine.pipeline import INITIAL_NOISE_STREAM
from blitzdiff.engine.solvers import build_plan
from blitzdiff.kernels.gaussian_noise import gaussian_noise_ref
from blitzdiff.models import default_channels_last

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
    """name -> (pipeline folder, the diffusers components it was saved from); "gray" is a bare model folder."""
    torch.manual_seed(0)  # diffusers initializes the weights before _randomize perturbs them: make runs repeat
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
    gray = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    folder = tmp_path_factory.mktemp("gray")
    _randomize(gray, 5).save_pretrained(folder)
    out["gray"] = folder, {"unet": gray}
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


@pytest.mark.parametrize("mode", [None, "eager"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dit_pipeline_matches_diffusers(folders, guidance, mode):
    # Learned sigma: the DiT returns [eps; variance] (8 channels for 4); both paths keep the leading 4, as diffusers.
    folder, parts = folders["dit"]
    pipe = blitzdiff.load(folder)
    if mode is not None:
        pipe.compile(mode)  # the compiled runtime's own NetworkCall (its reference mode runs on the CPU)
    x, labels = noise((3, 4, 8, 8)), torch.tensor([1, 7, 3])
    ours = pipe.sample(3, steps=STEPS, noise=x, class_labels=labels, guidance_scale=guidance, output_type="raw",
                       progress=False)
    assert_close(ours, diffusers_loop(parts, x, guidance=guidance, class_labels=labels))


def test_dit_guidance_defaults_to_diffusers_4(folders):
    folder, _ = folders["dit"]
    pipe = blitzdiff.load(folder)
    kwargs = dict(steps=2, noise=noise((1, 4, 8, 8)), class_labels=5, output_type="raw", progress=False)
    torch.testing.assert_close(pipe.sample(1, **kwargs), pipe.sample(1, guidance_scale=4.0, **kwargs))


@pytest.mark.parametrize(("name", "mode"), [("ddpm", "RGB"), ("gray", "L")])
def test_output_types(folders, name, mode):
    pipe = blitzdiff.load(folders[name][0])
    channels = 3 if mode == "RGB" else 1
    kwargs = dict(steps=2, seeds=3, progress=False)
    raw = pipe.sample(2, output_type="raw", **kwargs)
    tensor = pipe.sample(2, output_type="tensor", **kwargs)
    array = pipe.sample(2, output_type="numpy", **kwargs)
    images = pipe.sample(2, output_type="pil", **kwargs)
    assert torch.equal(tensor, (raw / 2 + 0.5).clamp(0, 1))  # a pixel model: [-1, 1] -> [0, 1], no VAE
    assert array.shape == (2, 8, 8, channels) and array.dtype == np.float32
    assert torch.equal(torch.from_numpy(array).permute(0, 3, 1, 2), tensor)
    pixels = (array * 255).round().astype(np.uint8)  # [0, 1] -> 0..255, rounded to nearest
    assert len(images) == 2
    for image, expected in zip(images, pixels, strict=True):
        assert image.mode == mode and image.size == (8, 8)
        assert np.array_equal(np.asarray(image), expected if channels == 3 else expected[..., 0])
    assert len(np.unique(pixels)) > 10  # the check sees many levels, not only clamped 0 / 255


def test_seeds_key_each_sample(folders):
    """Sample i depends on its seed only: its initial noise and its output are the same in any batch (up to the
    network's batch-dependent float32 rounding: matrix products tile differently per batch size)."""
    pipe = blitzdiff.load(folders["dit"][0])
    together = pipe.sample(3, steps=3, seeds=[5, 9, 2], class_labels=[1, 2, 3], output_type="raw", progress=False)
    alone = pipe.sample(1, steps=3, seeds=[9], class_labels=[2], output_type="raw", progress=False)
    assert_close(together[1:2], alone)
    assert (together[0] - together[2]).abs().max() > 0.1


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_initial_noise_is_independent_of_the_loops_noise(folders, monkeypatch):
    """x_T has its own stream: stage k draws from streams 2k (its point) and 2k + 1 (its update), so sharing one
    would correlate x_T with that stage's noise and skew every sample's variance."""
    pipe = blitzdiff.load(folders["ddpm"][0])
    draw, draws, inputs = blitzdiff.engine.sampler.gaussian, [], []

    def recorded(seeds, stream, shape, dtype, *, backend="ref"):
        draws.append(draw(seeds, stream, shape, dtype, backend=backend))
        return draws[-1]

    fused_draw = blitzdiff.engine.sampler.draw_noise  # the fused stages' draw (the same bits, fewer checks)

    def recorded_fused(seeds, stream, like, backend):
        draws.append(fused_draw(seeds, stream, like, backend))
        return draws[-1]

    monkeypatch.setattr(blitzdiff.engine.sampler, "gaussian", recorded)
    monkeypatch.setattr(blitzdiff.engine.sampler, "draw_noise", recorded_fused)
    for sampler in ("ddpm", "euler_ancestral"):
        draws.clear()
        inputs.clear()
        pipe.sample(4, steps=4, sampler=sampler, seeds=11, callback=lambda i, t, x: inputs.append(x.clone()),
                    output_type="raw", progress=False)
        initial = inputs[0]  # the first network input: x_T (c_in = 1 for epsilon; init_scale ~ 1)
        assert len(draws) >= 3  # an update noise in every stage (the last may have none)
        for z in draws:  # 768 values each: independent draws correlate by ~0.04
            assert abs(correlation(initial, z)) < 0.2, sampler
    # x_T is the stream INITIAL_NOISE_STREAM, above every stream of the longest plan: heun (2 evaluations per step
    # but the last, the most of any sampler) over the whole training schedule.
    assert correlation(initial, gaussian_noise_ref(torch.arange(11, 15), INITIAL_NOISE_STREAM, (3, 8, 8),
                                                   torch.float32)) > 0.9999
    config = resolve("heun", pipe.scheduler_config)
    assert INITIAL_NOISE_STREAM >= 2 * len(build_plan(config, config.num_train_timesteps).stages)


V_COSINE = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1}


@pytest.mark.parametrize("name", ["ddpm", "gray"])
def test_load_scheduler_config_replaces_the_folders(folders, tmp_path, name):
    # A pipeline folder's DDIM config replaced by a dict; a bare model's default (DDPM) by a scheduler folder.
    folder, parts = folders[name]
    scheduler = diffusers.DDIMScheduler(**V_COSINE)
    scheduler.save_pretrained(tmp_path)
    given = tmp_path if name == "gray" else json.loads((tmp_path / "scheduler_config.json").read_text())
    x = noise((2, parts["unet"].config.in_channels, 8, 8))
    kwargs = dict(steps=STEPS, noise=x, output_type="raw", progress=False)
    ours = blitzdiff.load(folder, scheduler_config=given).sample(2, **kwargs)
    assert_close(ours, diffusers_loop({**parts, "scheduler": scheduler}, x))
    folders_own = blitzdiff.load(folder).sample(2, **kwargs)
    assert ((ours - folders_own).abs().max() / folders_own.abs().max()).item() > 0.1


def conv_layouts(network: torch.nn.Module) -> set[str]:
    """The layouts of a network's convolution weights with a spatial kernel (a 1x1 kernel is both)."""
    return {"channels_last" if p.is_contiguous(memory_format=torch.channels_last) else "contiguous"
            for p in network.parameters() if p.dim() == 4 and p.shape[-2:].numel() > 1}


def test_load_stores_convolution_weights_channels_last_on_the_cpu(folders):
    """blitzdiff.load's CPU default (network and VAE decoder); channels_last=False keeps them contiguous, and
    compile(channels_last=...) switches later. Same images either way, to float32 rounding."""
    assert default_channels_last("cpu") and not default_channels_last(torch.device("cuda", 0))
    folder, _ = folders["sd"]
    prompt = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(steps=3, seeds=4, encoder_hidden_states=prompt, output_type="tensor", progress=False)
    pipe, plain = blitzdiff.load(folder), blitzdiff.load(folder, channels_last=False)
    assert conv_layouts(pipe.model) == conv_layouts(pipe.vae) == {"channels_last"}
    assert conv_layouts(plain.model) == conv_layouts(plain.vae) == {"contiguous"}
    images, expected = pipe.sample(2, **kwargs), plain.sample(2, **kwargs)
    assert images.is_contiguous() and (images - expected).abs().max().item() < 1e-5
    assert conv_layouts(pipe.compile("eager").model) == {"channels_last"}  # None keeps
    assert conv_layouts(pipe.compile("eager", channels_last=False).model) == {"contiguous"}
    assert conv_layouts(plain.compile("eager", channels_last=True).model) == {"channels_last"}
    for bad in ("yes", 1, 0.0):
        with pytest.raises(ValueError, match="channels_last must be True, False or None"):
            blitzdiff.load(folder, channels_last=bad)
        with pytest.raises(ValueError, match="channels_last must be True, False or None"):
            pipe.compile("eager", channels_last=bad)
    assert conv_layouts(pipe.model) == {"contiguous"}  # unchanged by the refused calls


def test_load_vae_decodes_with_the_given_vae(folders, tmp_path):
    # vae= gives a bare latent model its decoder, and replaces a pipeline folder's own.
    folder, parts = folders["dit"]
    parts["transformer"].save_pretrained(tmp_path / "dit")
    vae = _randomize(_vae(), 5)
    vae.save_pretrained(tmp_path / "vae")
    kwargs = dict(steps=2, seeds=4, class_labels=[2, 6], progress=False)
    for model_folder in (tmp_path / "dit", folder):
        raw = blitzdiff.load(model_folder).sample(2, output_type="raw", **kwargs)
        images = blitzdiff.load(model_folder, vae=tmp_path / "vae").sample(2, output_type="tensor", **kwargs)
        with torch.no_grad():
            expected = (vae.decode(raw / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        assert images.shape == (2, 3, 16, 16)
        assert (images - expected).abs().max().item() < 1e-4
    assert (blitzdiff.load(folder).sample(2, output_type="tensor", **kwargs) - images).abs().max() > 0.05
    assert blitzdiff.load(tmp_path / "dit").sample(2, output_type="tensor", **kwargs).shape == (2, 4, 8, 8)  # latents


def test_height_and_width_set_the_latent_size(folders):
    folder, parts = folders["sd"]
    pipe = blitzdiff.load(folder)
    prompt = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(2))
    x = noise((1, 4, 6, 10))  # 12 x 20 pixels: the VAE scales by 2
    ours = pipe.sample(1, steps=STEPS, noise=x, height=12, width=20, encoder_hidden_states=prompt, output_type="raw",
                       progress=False)
    assert_close(ours, diffusers_loop(parts, x, encoder_hidden_states=prompt))
    images = pipe.sample(1, steps=2, height=12, width=20, encoder_hidden_states=prompt, output_type="tensor",
                         progress=False)
    assert images.shape == (1, 3, 12, 20)
    pixels = blitzdiff.load(folders["ddpm"][0]).sample(1, steps=2, height=6, width=4, output_type="tensor",
                                                       progress=False)
    assert pixels.shape == (1, 3, 6, 4)  # no VAE: height and width are the sample's own


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
    "width": ("sd", {"encoder_hidden_states": torch.zeros(1, 5, 8), "width": 9}, r"width=9 must be a positive "
              r"multiple of 2"),
    "height-zero": ("sd", {"encoder_hidden_states": torch.zeros(1, 5, 8), "height": 0}, r"height=0 must be a "
                    r"positive multiple of 2"),
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
    faulty.cpu_graphs = None  # Faulty counts its calls in Python: one eager forward per evaluation
    with pytest.raises(blitzdiff.engine.pipeline.NonFiniteOutput, match=r"NaN or Inf at evaluation 2 \(timestep"):
        faulty.sample(1, steps=4, progress=False)
    with pytest.raises(ValueError, match=r"unknown on_non_finite 'ignore'; allowed: raise, retry"):
        faulty.sample(1, steps=4, progress=False, on_non_finite="ignore")


def test_non_finite_half_network_retries_in_float32(folders):
    pipe = blitzdiff.load(folders["ddpm"][0], dtype=torch.bfloat16)
    faulty = blitzdiff.Pipeline(Faulty(pipe.model, bad_from=1), pipe.scheduler_config)
    faulty.cpu_graphs = None  # as above
    with pytest.raises(blitzdiff.engine.pipeline.NonFiniteOutput, match=r"in torch.bfloat16; pass on_non_finite="):
        faulty.sample(1, steps=3, seeds=1, progress=False, output_type="raw")
    out = faulty.sample(1, steps=3, seeds=1, progress=False, output_type="raw", on_non_finite="retry")
    reference = blitzdiff.load(folders["ddpm"][0]).sample(1, steps=3, seeds=1, progress=False, output_type="raw")
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    # The retry ran a float32 copy of the bf16-rounded weights: the float32 model's result up to that rounding
    # (2^-8 relative per weight; 3e-3 measured), and nowhere near NaN.
    assert ((out - reference).abs().max() / reference.abs().max()).item() < 2e-2
