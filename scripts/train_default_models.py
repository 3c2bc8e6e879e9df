"""Train the embedded default models of blitzdiff on the 16x16 digits (blitzdiff/assets/digits.npz), on CPU.

Writes, under blitzdiff/assets/:
- digits_judge.safetensors: the classifier behind `blitzdiff.quality` (FD features and class accuracy);
- unet-digits/: an unconditional pixel-space UNet2DModel + DDPMScheduler (diffusers DDPMPipeline layout);
- dit-digits/: a class-conditional pixel-space DiT + DDPMScheduler (DiTPipeline layout without a VAE), trained with
  10% label dropout to the null class 10, so classifier-free guidance works.

The diffusion models are trained with blitzdiff's own model classes (parameter names = diffusers' keys), epsilon
prediction (DDPM, Ho et al. 2020, "simple" loss), AdamW with warm-up and cosine decay, and an EMA of the weights,
which is what is saved (float16, to keep the package small). Everything is seeded; the script then samples each
model with blitzdiff.sample, writes a PNG grid and prints `blitzdiff.quality.evaluate` figures.

    python scripts/train_default_models.py [--only judge unet dit] [--check-only] [--png-dir /tmp]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import blitzdiff
from blitzdiff import quality
from blitzdiff.engine.schedules import training_betas
from blitzdiff.models.dit import DiT
from blitzdiff.models.unet_2d import UNet2DModel

SEED = 0
ASSETS = Path(quality.__file__).parent / "assets"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose config fields these files spell out
NULL_CLASS = 10  # the DiT label embedding's extra row: "no class", for classifier-free guidance
LABEL_DROPOUT = 0.1  # diffusers' and DiT's class_dropout_prob

# DDPMScheduler, every field. Linear betas as DDPM; "trailing" spacing so few-step samplers start at the last
# training timestep (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
# clip_sample off: DDIM (diffusers' and so ours) clips x0 but keeps the unclipped epsilon for the direction term, and
# with guidance that mismatch ruins samples (DiT, DDIM 50 steps, guidance 2: judge accuracy 0.74 with clipping,
# 1.00 without); unguided it changed little (UNet, n = 300: DDPM 250 steps FD 34.0 both ways, DDIM 20: 47.7 / 48.3).
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": False, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "trailing", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
# UNet2DModel, every field: 16x16 -> 8x8 -> 4x4 with self-attention at 8x8 and 4x4 (and in the mid block).
UNET_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"], "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "block_out_channels": [32, 64, 64],
    "layers_per_block": 1, "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 32, "norm_num_groups": 8,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
# DiTTransformer2DModel, every field: 8x8 tokens of 2x2 patches, fixed sigma (out_channels == in_channels).
DIT_CONFIG = {
    "_class_name": "DiTTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
    "num_attention_heads": 4, "attention_head_dim": 24, "in_channels": 1, "out_channels": 1, "num_layers": 6,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 16, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 10, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
TRAINING = {  # per model: optimizer steps, batch, peak learning rate, EMA decay
    "unet": {"steps": 4000, "batch": 64, "lr": 1e-3, "ema_decay": 0.999},
    "dit": {"steps": 3500, "batch": 64, "lr": 1e-3, "ema_decay": 0.999},
}
COMPONENTS = {"unet": (UNET_CONFIG, "unet"), "dit": (DIT_CONFIG, "transformer")}  # model -> (config, folder)


MODEL_CLASSES: dict[str, type[nn.Module]] = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiT}


# ---------------------------------------------------------------------------------------------------------- judge

def train_judge(epochs: int = 40, batch: int = 64) -> None:
    """The quality judge: Adam, random +-1 pixel shifts; it never sees the held-out split."""
    torch.manual_seed(SEED)
    images, labels = quality.load_digits("train")
    model = quality.DigitsJudge()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(images) / batch))
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(images)).split(batch):
            dy, dx = torch.randint(-1, 2, (2,)).tolist()
            x = torch.roll(F.pad(images[idx], (1, 1, 1, 1), value=-1.0), (dy, dx), (2, 3))[..., 1:-1, 1:-1]
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"judge epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(quality.JUDGE_PATH))
    quality.judge.cache_clear()
    quality._heldout_statistics.cache_clear()
    print(f"judge: trained in {time.perf_counter() - start:.0f} s")
    report_judge()


def report_judge() -> None:
    """The reference figures of real data: the judge's held-out accuracy and FD(held-out, train)."""
    heldout, heldout_labels = quality.load_digits("heldout")
    print(f"judge: held-out accuracy {quality.class_accuracy(heldout, heldout_labels):.4f}; FD(held-out, train) "
          f"{quality.frechet_distance(heldout, quality.load_digits('train')[0]):.3f}")


# ------------------------------------------------------------------------------------------------------ diffusion

def initialize(model: nn.Module, zero: tuple[str, ...]) -> None:
    """Deterministic training init whatever the class does at construction: PyTorch's defaults for conv / linear /
    embedding, unit / zero norm affines; modules whose name ends with an entry of `zero` start at zero (DDPM's last
    conv of each residual branch, DiT's adaLN-Zero), so every block starts as the identity.

    The label embedding keeps PyTorch's N(0, 1), not the original DiT's N(0, 0.02): at 0.02 the class signal is
    ~50x weaker than the timestep embedding's and in a CPU-sized run it never caught up (judge accuracy of guided
    samples at chance after 1500 steps, 0.99 after 1000 steps with N(0, 1))."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.reset_parameters()
        else:
            for pname, param in module.named_parameters(recurse=False):
                assert param.dim() == 1 and pname in ("weight", "bias"), f"no init rule for {name}.{pname}"
                nn.init.ones_(param) if pname == "weight" else nn.init.zeros_(param)
        if name.endswith(zero):
            for param in module.parameters():
                nn.init.zeros_(param)


def build(config: dict) -> nn.Module:
    torch.manual_seed(SEED)
    model = MODEL_CLASSES[config["_class_name"]].from_config(config)
    if config["_class_name"] == "DiTTransformer2DModel":
        # One timestep / label embedder for all blocks, as in the original DiT; diffusers' layout stores a copy
        # per block (its converter writes the same weights into each), and so do the saved files.
        for block in model.transformer_blocks[1:]:
            block.norm1.emb = model.transformer_blocks[0].norm1.emb
        initialize(model, zero=("norm1.linear", "proj_out_1", "proj_out_2"))
    else:
        initialize(model, zero=("conv2", "to_out.0", "conv_out"))
    return model


def target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict, per SCHEDULER_CONFIG's prediction_type."""
    if SCHEDULER_CONFIG["prediction_type"] == "epsilon":
        return eps
    assert SCHEDULER_CONFIG["prediction_type"] == "v_prediction"
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0  # v = alpha eps - sigma x0 (Salimans & Ho 2022)


def train_diffusion(model: nn.Module, conditional: bool, steps: int, batch: int, lr: float,
                    ema_decay: float) -> nn.Module:
    """Epsilon-prediction training (t uniform, MSE); returns the EMA model."""
    images, labels = quality.load_digits("train")
    betas = training_betas(SCHEDULER_CONFIG["beta_schedule"], SCHEDULER_CONFIG["num_train_timesteps"],
                           SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"])
    alpha_bar = torch.cumprod(1.0 - betas, 0)  # float32, as diffusers' add_noise uses it
    gen = torch.Generator().manual_seed(SEED)
    ema = copy.deepcopy(model).requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.55 + 0.45 * math.cos(
        math.pi * s / steps)))
    model.eval()  # no train-only behaviour (dropout is 0); the label dropout is done here, explicitly
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        t = torch.randint(0, len(alpha_bar), (batch,), generator=gen)
        eps = torch.randn(batch, 1, 16, 16, generator=gen)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * images[idx] + (1 - ab).sqrt() * eps  # [B, 1, 16, 16]
        kwargs = {}
        if conditional:
            drop = torch.rand(batch, generator=gen) < LABEL_DROPOUT
            kwargs["class_labels"] = torch.where(drop, NULL_CLASS, labels[idx])
        loss = F.mse_loss(model(x_t, t, **kwargs), target(images[idx], eps, ab))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA with a warm-up of its decay, so early weights do not linger
            torch._foreach_lerp_(ema_params, params, 1.0 - min(ema_decay, (1 + step) / (10 + step)))
        running += loss.item()
        if (step + 1) % 250 == 0:
            print(f"  step {step + 1}/{steps}: loss {running / 250:.4f} ({time.perf_counter() - start:.0f} s)")
            running = 0.0
    print(f"  trained in {time.perf_counter() - start:.0f} s")
    return ema


def save_pipeline(folder: Path, pipeline: dict, component: str, model: nn.Module, config: dict) -> None:
    """diffusers layout: model_index.json, <component>/{config.json, diffusion_pytorch_model.safetensors},
    scheduler/scheduler_config.json. Weights in float16 (loaders convert them to float32)."""
    (folder / component).mkdir(parents=True, exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(pipeline, indent=2) + "\n")
    (folder / component / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    tensors = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / component / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def load_component(folder: Path, component: str) -> nn.Module:
    """Rebuild a saved model from its files alone, in float32: what a user of the assets gets."""
    config = json.loads((folder / component / "config.json").read_text())
    model = MODEL_CLASSES[config["_class_name"]].from_config(config)
    state = {k: v.float() for k, v in load_file(folder / component / "diffusion_pytorch_model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ sample checks

def save_grid(images: torch.Tensor, path: Path, columns: int = 10) -> None:
    """[N, 1, 16, 16] in [-1, 1] -> a PNG grid, 4x enlarged, 2 px gaps."""
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    rows = math.ceil(len(pixels) / columns)
    grid = np.full((rows * 18, columns * 18), 128, np.uint8)
    for i, tile in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * 18 + 1:r * 18 + 17, c * 18 + 1:c * 18 + 17] = tile
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


@torch.inference_mode()
def check_samples(name: str, model: nn.Module, conditional: bool, png_dir: Path, per_class: int = 50) -> None:
    """Sample 10 * per_class images with a few samplers / step counts; print quality.evaluate; save a grid."""
    n = 10 * per_class
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(SEED + 1))
    labels = torch.arange(10).repeat(per_class)  # columns of the grid are classes 0..9
    settings = [("dpmpp_2m", 20, 1.0), ("dpmpp_2m", 50, 1.0), ("ddim", 20, 1.0), ("ddim", 50, 1.0)]
    if conditional:
        settings += [("dpmpp_2m", 20, 2.0), ("dpmpp_2m", 50, 2.0), ("ddim", 50, 2.0), ("dpmpp_2m", 20, 4.0)]
    for sampler, steps, scale in settings:
        start = time.perf_counter()
        if conditional:
            samples = blitzdiff.sample(
                lambda x, t, class_labels: model(x, t, class_labels=class_labels), noise, steps=steps,
                sampler=sampler, scheduler_config=SCHEDULER_CONFIG, guidance_scale=scale,
                cond={"class_labels": labels}, uncond={"class_labels": torch.full_like(labels, NULL_CLASS)})
        else:
            samples = blitzdiff.sample(lambda x, t: model(x, t), noise, steps=steps, sampler=sampler,
                                       scheduler_config=SCHEDULER_CONFIG)
        result = quality.evaluate(samples.clamp(-1, 1), labels if conditional else None)
        print(f"  {sampler:9s} {steps:3d} steps, guidance {scale}: FD {result['fd']:7.3f}"
              + (f", accuracy {result['accuracy']:.3f}" if conditional else "")
              + f", judge's classes {result['class_counts']} ({time.perf_counter() - start:.0f} s)")
        path = png_dir / f"blitzdiff_{name}_{sampler}_{steps}_g{scale:g}.png"
        save_grid(samples[:100], path)
    print(f"  grids: {png_dir}/blitzdiff_{name}_*.png")


# -------------------------------------------------------------------------------------------------------- main

def train_model(name: str, png_dir: Path) -> None:
    conditional = name == "dit"
    config, component = COMPONENTS[name]
    pipeline = {"_class_name": "DiTPipeline" if conditional else "DDPMPipeline",
                "_diffusers_version": DIFFUSERS_VERSION, component: ["diffusers", config["_class_name"]],
                "scheduler": ["diffusers", "DDPMScheduler"]}
    if conditional:
        # the recommended guidance: lowest FD at n = 200 (dpmpp_2m, 10 and 20 steps; 1.0 / 1.25 / 1.5 / 2.0 measured
        # for the shipped weights, README "The embedded default models"); re-measure it after retraining
        pipeline |= {"vae": [None, None], "id2label": {str(i): str(i) for i in range(10)},
                     "_blitzdiff_guidance_scale": 1.25}
    model = build(config)
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} trained parameters, {TRAINING[name]}")
    ema = train_diffusion(model, conditional, **TRAINING[name])
    folder = ASSETS / f"{name}-digits"
    save_pipeline(folder, pipeline, component, ema, config)
    check_samples(name, load_component(folder, component), conditional, png_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("judge", "unet", "dit"), default=("judge", "unet", "dit"))
    parser.add_argument("--check-only", action="store_true", help="train nothing: report on the shipped files")
    parser.add_argument("--png-dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    args.png_dir.mkdir(parents=True, exist_ok=True)
    if "judge" in args.only:
        report_judge() if args.check_only else train_judge()
    for name in ("unet", "dit"):
        if name in args.only and args.check_only:
            print(f"{name}: the shipped {name}-digits")
            check_samples(name, load_component(ASSETS / f"{name}-digits", COMPONENTS[name][1]), name == "dit",
                          args.png_dir)
        elif name in args.only:
            train_model(name, args.png_dir)


if __name__ == "__main__":
    main()
