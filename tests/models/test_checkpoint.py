"""Checkpoint loading: diffusers model / pipeline folders and original DiT checkpoints -> blitzdiff models.

Tiny diffusers models with random weights are saved with diffusers' own save_pretrained (single file, shards,
variants, pickles, pipelines); the loaded blitzdiff model must compute what the diffusers model computes, and every
malformed checkpoint must be a ValueError that names the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from safetensors.torch import load_file, save_file
from torch import nn

from blitzdiff.models import (
    MODEL_CLASSES,
    describe,
    dit,
    load_component,
    load_model,
    model_class,
    read_pipeline,
    set_backend,
)
from blitzdiff.models.checkpoint import WEIGHTS


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    # Perturb every weight (diffusers zero-initializes some layers), so a wrongly wired tensor shows in the output.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _tiny_unet() -> UNet2DModel:
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def _tiny_cond_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, attention_head_dim=2, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _tiny_dit(heads: int = 2, head_dim: int = 8, layers: int = 2, sample_size: int = 8) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                 out_channels=8, num_layers=layers, sample_size=sample_size, patch_size=2,
                                 num_embeds_ada_norm=10)


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, sample_size=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


_gen = torch.Generator().manual_seed(0)
_t = torch.tensor([3, 700])
# name -> (diffusers model factory, inputs, diffusers call, blitzdiff call)
CASES = {
    "unet": (_tiny_unet, {"x": torch.randn(2, 3, 8, 8, generator=_gen)},
             lambda m, x: m(x, _t).sample, lambda m, x: m(x, _t)),
    "cond_unet": (_tiny_cond_unet,
                  {"x": torch.randn(2, 4, 8, 8, generator=_gen), "c": torch.randn(2, 5, 8, generator=_gen)},
                  lambda m, x, c: m(x, _t, encoder_hidden_states=c).sample,
                  lambda m, x, c: m(x, _t, encoder_hidden_states=c)),
    "dit": (_tiny_dit, {"x": torch.randn(2, 4, 8, 8, generator=_gen), "y": torch.tensor([1, 10])},
            lambda m, x, y: m(x, timestep=_t, class_labels=y).sample, lambda m, x, y: m(x, _t, y)),
    "vae": (_tiny_vae, {"z": torch.randn(2, 4, 8, 8, generator=_gen)},
            lambda m, z: m.decode(z / m.config.scaling_factor).sample, lambda m, z: m(z)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """Each tiny diffusers model, randomized, and the folder its save_pretrained wrote."""
    out = {}
    for seed, (name, (factory, *_)) in enumerate(CASES.items()):
        model, folder = _randomize(factory(), seed), tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = model, folder
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_same_output(name: str, reference: nn.Module, ours: nn.Module, device: str = "cpu",
                        rtol: float = 1e-5) -> None:
    """Our model's output on CASES[name]'s inputs (floating ones cast to our model's dtype) equals the diffusers
    model's (float32, CPU) to `rtol` (max-norm)."""
    _, inputs, call_ref, call_ours = CASES[name]
    dtype = next(ours.parameters()).dtype
    with torch.no_grad():
        expected = call_ref(reference, **inputs)
        got = call_ours(ours, **{k: v.to(device, dtype if v.is_floating_point() else v.dtype)
                                 for k, v in inputs.items()}).float().cpu()
    assert got.shape == expected.shape
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err <= rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_loads_diffusers_model_and_matches_its_output(saved, name):
    reference, folder = saved[name]
    ours = load_model(folder)
    assert type(ours) is model_class(reference.__class__.__name__)
    assert not ours.training
    assert {t.dtype for t in ours.state_dict().values()} == {torch.float32}
    _assert_same_output(name, reference, ours)


def test_vae_decoder_drops_the_encoder_on_purpose(saved):
    reference, folder = saved["vae"]
    keys = set(load_model(folder).state_dict())
    assert any(k.startswith("encoder.") for k in reference.state_dict())  # the checkpoint is a full AutoencoderKL
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in keys)
    assert keys == {k for k in reference.state_dict() if not k.startswith(("encoder.", "quant_conv."))}


def test_sharded_checkpoint(saved, tmp_path):
    reference, _ = saved["unet"]
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob(f"{WEIGHTS}-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / f"{WEIGHTS}.safetensors.index.json").is_file()
    _assert_same_output("unet", reference, load_model(tmp_path))

    info = describe(tmp_path)
    assert list(info["files"]) == [f"{WEIGHTS}.safetensors.index.json", *(s.name for s in shards)]
    assert info["bytes"] == sum(f.stat().st_size for f in tmp_path.glob(f"{WEIGHTS}*"))

    shards[1].unlink()
    with pytest.raises(ValueError, match=rf"index\.json: shard {shards[1].name} is missing"):
        load_model(tmp_path)


def test_variant_and_explicit_weights_file(saved, tmp_path):
    reference, folder = saved["dit"]
    half = _tiny_dit().half()
    half.load_state_dict(reference.state_dict())
    half.save_pretrained(tmp_path, variant="fp16")
    assert [p.name for p in tmp_path.glob("*.safetensors")] == [f"{WEIGHTS}.fp16.safetensors"]
    ours = load_model(tmp_path)  # the only variant; float32 by default
    for key, value in ours.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, half.state_dict()[key].float(), rtol=0, atol=0)

    shutil.copy(folder / f"{WEIGHTS}.safetensors", tmp_path / f"{WEIGHTS}.ema.safetensors")
    (tmp_path / f"{WEIGHTS}.fp16.safetensors").rename(tmp_path / f"{WEIGHTS}.bf16.safetensors")
    with pytest.raises(ValueError, match=r"several weight variants .*bf16.*ema.*pass the path"):
        load_model(tmp_path)
    _assert_same_output("dit", reference, load_model(tmp_path / f"{WEIGHTS}.ema.safetensors"))


def test_pickle_refused_unless_allowed(saved, tmp_path):
    reference, _ = saved["dit"]
    reference.save_pretrained(tmp_path, safe_serialization=False)
    weights = tmp_path / f"{WEIGHTS}.bin"
    assert weights.is_file()
    for path in (tmp_path, weights):
        with pytest.raises(ValueError, match=rf"{weights}: refusing to unpickle.*safetensors.*allow_pickle=True"):
            load_model(path)
    _assert_same_output("dit", reference, load_model(tmp_path, allow_pickle=True))

    weights.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=rf"{weights}: torch.load\(weights_only=True\) cannot read it"):
        load_model(tmp_path, allow_pickle=True)


def _edit_weights(folder: Path, edit) -> Path:
    path = folder / f"{WEIGHTS}.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return path


def test_legacy_attention_names_load(saved, tmp_path):
    """Checkpoints from before diffusers 0.14 (google/ddpm-*) name attention projections query / key / value /
    proj_attn; they load as to_q / to_k / to_v / to_out.0, as diffusers loads them."""
    reference, folder = saved["unet"]
    legacy = _copy(folder, tmp_path / "legacy")
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(state):
        for key in [k for k in state if ".attentions." in k]:
            for new, old in new_to_old.items():
                if f".{new}." in key:
                    state[key.replace(f".{new}.", f".{old}.")] = state.pop(key)

    _edit_weights(legacy, rename)
    assert any(".query." in k for k in load_file(legacy / f"{WEIGHTS}.safetensors"))
    _assert_same_output("unet", reference, load_model(legacy))


def test_missing_unexpected_and_mismatched_keys_name_file_and_key(saved, tmp_path):
    _, folder = saved["dit"]
    missing = _copy(folder, tmp_path / "missing")
    path = _edit_weights(missing, lambda s: s.pop("proj_out_2.bias"))
    with pytest.raises(ValueError, match=rf"{path} does not fit .*1 missing key\(s\): proj_out_2.bias$"):
        load_model(missing)

    unexpected = _copy(folder, tmp_path / "unexpected")
    extra = {f"extra.{i}.weight": torch.zeros(1) for i in range(7)}
    path = _edit_weights(unexpected, lambda s: s.update(extra))
    with pytest.raises(ValueError, match=rf"{path} does not fit .*7 unexpected key\(s\): extra.0.weight, "
                                         r"extra.1.weight, .* \(2 more\)$"):
        load_model(unexpected)

    mismatched = _copy(folder, tmp_path / "mismatched")
    path = mismatched / f"{WEIGHTS}.safetensors"
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "num_embeds_ada_norm": 12}))
    key = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    expected = (rf"{path} does not fit the DiTTransformer2DModel of {mismatched}/config.json: shape mismatch for "
                rf"'{key}' in {WEIGHTS}.safetensors: checkpoint \[11, 16\], the config gives \[13, 16\]")
    with pytest.raises(ValueError, match=expected):
        load_model(mismatched)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(saved, tmp_path, damage):
    folder = _copy(saved["unet"][1], tmp_path / "unet")
    path = folder / f"{WEIGHTS}.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-1000], "garbage": b"\x13\x37" * 500, "empty": b""}[damage])
    with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
        load_model(folder)
    with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
        describe(folder)


def test_config_errors_name_the_config_file(saved, tmp_path):
    folder = _copy(saved["unet"][1], tmp_path / "unet")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "no_such_field": 1}))
    with pytest.raises(ValueError, match=rf"{config_file}: .*no_such_field"):
        load_model(folder)
    config_file.write_text(json.dumps({**config, "_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ValueError, match=rf"{config_file}: unsupported model class 'SD3Transformer2DModel'; "
                                         r"supported diffusers classes: AutoencoderKL, DiTTransformer2DModel"):
        load_model(folder)
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{config_file}: not valid JSON"):
        load_model(folder)
    config_file.unlink()
    with pytest.raises(ValueError, match=rf"{folder}: neither a diffusers model folder"):
        load_model(folder)
    with pytest.raises(ValueError, match=r"no such file or folder"):
        load_model(tmp_path / "nowhere")
    (folder / f"{WEIGHTS}.safetensors").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{folder}: no diffusers weights"):
        load_model(folder)


def test_legacy_transformer2d_config_loads_as_dit(saved, tmp_path):
    reference, folder = saved["dit"]
    folder = _copy(folder, tmp_path / "dit")
    config = json.loads((folder / "config.json").read_text())
    legacy = {"_class_name": "Transformer2DModel", "cross_attention_dim": None, "num_vector_embeds": None,
              "only_cross_attention": False, "use_linear_projection": False}
    (folder / "config.json").write_text(json.dumps({**config, **legacy}))
    _assert_same_output("dit", reference, load_model(folder))


def test_dtype_and_device(saved):
    reference, folder = saved["dit"]
    ours = load_model(folder, dtype=torch.bfloat16, device="cpu")
    assert {t.dtype for t in ours.state_dict().values()} == {torch.bfloat16}
    assert {t.device for t in ours.state_dict().values()} == {torch.device("cpu")}
    assert load_model(folder, dtype="float16").proj_out_2.weight.dtype == torch.float16
    for bad in (torch.int64, "int8", "float17"):
        with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
            load_model(folder, dtype=bad)
    with pytest.raises(ValueError, match=r"device must be one of cpu, cuda \(or cuda:N\), got 'nonsense'"):
        load_model(folder, device="nonsense")
    with pytest.raises(ValueError, match="device='meta' would discard the weights"):
        load_model(folder, device="meta")


@pytest.mark.cuda
def test_loads_onto_cuda(saved):
    reference, folder = saved["dit"]
    ours = load_model(folder, device="cuda", dtype=torch.float16)
    assert {(t.device.type, t.dtype) for t in ours.state_dict().values()} == {("cuda", torch.float16)}
    _assert_same_output("dit", reference, ours, device="cuda", rtol=1e-2)


class BufferToy(nn.Module):
    """A test-only model with a non-persistent buffer (computed, in no checkpoint), as a model may have one."""

    diffusers_class = "BufferToy"

    def __init__(self, width: int):
        super().__init__()
        self.config = {"width": width}
        self.proj = nn.Linear(width, width)
        self.register_buffer("freqs", torch.arange(width, dtype=torch.float32) / width, persistent=False)

    @classmethod
    def from_config(cls, config):
        return cls(config["width"])


def test_non_persistent_buffers_are_computed(tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_CLASSES, "BufferToy", f"{__name__}:BufferToy")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "BufferToy", "width": 4}))
    weights = {"proj.weight": torch.randn(4, 4), "proj.bias": torch.randn(4)}
    save_file(weights, tmp_path / f"{WEIGHTS}.safetensors")
    toy = load_model(tmp_path, dtype=torch.float64)
    assert toy.freqs.dtype == torch.float64 and not toy.freqs.is_meta
    torch.testing.assert_close(toy.freqs, torch.arange(4, dtype=torch.float64) / 4)
    torch.testing.assert_close(toy.proj.weight, weights["proj.weight"].double())


def _original_dit(model: DiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """A diffusers DiT whose blocks share one embedder, as the original facebookresearch/DiT state dict."""
    sd, blocks = model.state_dict(), model.config.num_layers
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "pos_embed": model.pos_embed.pos_embed.clone(),
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for kind in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{kind}"] = sd[emb + f"timestep_embedder.linear_1.{kind}"]
        out[f"t_embedder.mlp.2.{kind}"] = sd[emb + f"timestep_embedder.linear_2.{kind}"]
        for i in range(blocks):
            block = f"transformer_blocks.{i}."
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[block + f"attn1.to_{p}.{kind}"] for p in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[block + f"attn1.to_out.0.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[block + f"ff.net.0.proj.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[block + f"ff.net.2.{kind}"]
            out[f"blocks.{i}.adaLN_modulation.1.{kind}"] = sd[block + f"norm1.linear.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def original_dit(tmp_path_factory) -> tuple[DiTTransformer2DModel, Path, Path]:
    """A DiT-S-width (hidden 384, a DiT preset) two-block DiT, saved in the original format as .safetensors / .pt."""
    model = _randomize(_tiny_dit(heads=6, head_dim=64, layers=2), seed=7)
    with torch.no_grad():  # the original has one embedder; diffusers' converter copies it into every block
        model.transformer_blocks[1].norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    folder = tmp_path_factory.mktemp("original_dit")
    state = _original_dit(model)
    save_file(state, folder / "DiT-S-2.safetensors")
    torch.save(state, folder / "DiT-S-2.pt")
    return model, folder / "DiT-S-2.safetensors", folder / "DiT-S-2.pt"


def test_original_dit_checkpoint(original_dit, tmp_path):
    reference, safetensors_file, pickle_file = original_dit
    ours = load_model(safetensors_file)
    assert ours.config["sample_size"] == 8 and ours.config["num_attention_heads"] == 6
    _assert_same_output("dit", reference, ours)

    with pytest.raises(ValueError, match=rf"{pickle_file}: refusing to unpickle"):
        load_model(pickle_file)
    _assert_same_output("dit", reference, load_model(pickle_file, allow_pickle=True))
    training = tmp_path / "0050000.pt"  # DiT's train.py layout (without its argparse entry): the EMA weights load
    torch.save({"model": {}, "ema": load_file(safetensors_file)}, training)
    _assert_same_output("dit", reference, load_model(training, allow_pickle=True))

    # The shared embedder stays one tensor per dtype conversion, not one per block.
    half = load_model(safetensors_file, dtype=torch.float16)
    tables = [b.norm1.emb.class_embedder.embedding_table.weight for b in half.transformer_blocks]
    assert tables[0].dtype == torch.float16 and tables[0].data_ptr() == tables[1].data_ptr()

    info = describe(safetensors_file)
    assert info["format"] == "original DiT checkpoint" and info["class"] == "DiTTransformer2DModel"
    assert info["parameters"] == sum(t.numel() for t in load_file(safetensors_file).values())
    assert info["files"] == {safetensors_file.name: safetensors_file.stat().st_size}


def test_original_dit_image_size(original_dit, tmp_path):
    reference, safetensors_file, _ = original_dit
    state = load_file(safetensors_file)
    del state["pos_embed"]
    no_table = tmp_path / "no_pos_embed.safetensors"
    save_file(state, no_table)
    with pytest.raises(ValueError, match=rf"{no_table}: .*no pos_embed: pass image_size"):
        load_model(no_table)
    _assert_same_output("dit", reference, load_model(no_table, image_size=64))  # 64 px / 8 = latent 8
    with pytest.raises(ValueError, match=rf"{safetensors_file}: image_size 128 .* contradicts"):
        load_model(safetensors_file, image_size=128)


def test_image_size_only_for_original_dit(saved):
    with pytest.raises(ValueError, match="image_size applies to original DiT checkpoints only"):
        load_model(saved["dit"][1], image_size=256)


def test_weights_file_without_config_is_refused(saved, tmp_path):
    path = tmp_path / "unet.safetensors"
    shutil.copy(saved["unet"][1] / f"{WEIGHTS}.safetensors", path)
    with pytest.raises(ValueError, match=rf"{path}: not an original DiT checkpoint .* no config.json"):
        load_model(path)
    (tmp_path / "unet.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unet.onnx: unknown checkpoint format"):
        load_model(tmp_path / "unet.onnx")


@pytest.fixture(scope="module")
def dit_pipeline(saved, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dit_pipeline")
    pipe = DiTPipeline(transformer=saved["dit"][0], vae=saved["vae"][0], scheduler=DDIMScheduler(),
                       id2label={0: "tench", 1: "goldfish"})
    pipe.save_pretrained(root)
    return root


def test_pipeline_folder(saved, dit_pipeline):
    files = read_pipeline(dit_pipeline)
    assert files.root == dit_pipeline and files.denoiser == dit_pipeline / "transformer"
    assert files.denoiser_class == "DiTTransformer2DModel" and files.vae == dit_pipeline / "vae"
    assert set(files.components) == {"transformer", "vae", "scheduler"}
    assert files.scheduler_config["_class_name"] == "DDIMScheduler"
    assert files.model_index["_class_name"] == "DiTPipeline"

    _assert_same_output("dit", saved["dit"][0], load_model(dit_pipeline))
    _assert_same_output("vae", saved["vae"][0], load_component(dit_pipeline, "vae"))
    with pytest.raises(ValueError, match=r"pipeline has no component 'unet'; it has scheduler, transformer, vae"):
        load_component(dit_pipeline, "unet")

    info = describe(dit_pipeline)
    dit = saved["dit"][0]
    assert info["format"] == "diffusers pipeline" and info["pipeline"] == "DiTPipeline"
    assert info["class"] == "DiTTransformer2DModel" and info["scheduler"] == "DDIMScheduler"
    assert info["parameters"] == sum(t.numel() for t in dit.state_dict().values())
    assert info["dtypes"] == ["float32"]
    assert info["files"] == {f"transformer/{WEIGHTS}.safetensors":
                             (dit_pipeline / "transformer" / f"{WEIGHTS}.safetensors").stat().st_size}
    assert info["config"] == {"sample_size": 8, "in_channels": 4, "out_channels": 8, "num_embeds_ada_norm": 10}
    vae = info["vae"]
    assert vae["class"] == "AutoencoderKL" and vae["config"]["latent_channels"] == 4
    assert vae["parameters"] == sum(t.numel() for t in saved["vae"][0].state_dict().values())  # encoder included


def test_unet_pipeline_and_pipeline_errors(saved, tmp_path):
    root = tmp_path / "ddpm"
    DDPMPipeline(unet=saved["unet"][0], scheduler=DDPMScheduler()).save_pretrained(root)
    files = read_pipeline(root)
    assert files.denoiser == root / "unet" and files.vae is None and files.denoiser_class == "UNet2DModel"
    assert describe(root)["scheduler"] == "DDPMScheduler" and describe(root)["vae"] is None
    _assert_same_output("unet", saved["unet"][0], load_model(root))

    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "unet": [None, None], "safety_checker": [None, None]}))
    with pytest.raises(ValueError, match=r"model_index.json: no denoiser \(unet or transformer\) among its "
                                         r"components \(scheduler\)"):
        read_pipeline(root)
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ValueError, match=r"scheduler_config.json: not found"):
        load_model(root)


def test_set_backend_and_registry(saved, monkeypatch):
    model = load_model(saved["dit"][1])
    with_backend = [m for m in model.modules() if hasattr(m, "backend")]
    assert with_backend and all(m.backend == "ref" for m in with_backend)
    assert set_backend(model, "triton") is model
    assert all(m.backend == "triton" for m in with_backend)
    with pytest.raises(ValueError, match=r"unknown kernel backend 'fast'; backends are ref, triton, cuda, cpu"):
        set_backend(model, "fast")
    assert set_backend(model, "cpu") is model  # every layer has a C++ kernel
    assert all(m.backend == "cpu" for m in with_backend)
    set_backend(model, "triton")
    # a layer without the backend (attention played it, before it had a C++ one): refused up front, every layer
    # left as it was
    monkeypatch.setattr(dit.Attention, "KERNEL_BACKENDS", ("ref", "triton", "cuda", "auto"))
    with pytest.raises(ValueError, match=r"kernel backend 'cpu' is not available for every layer of DiT: "
                                         r"blitzdiff.models.dit.Attention takes ref, triton, cuda, auto"):
        set_backend(model, "cpu")
    assert all(m.backend == "triton" for m in with_backend)
    with pytest.raises(ValueError, match=r"unsupported model class 'UNet3DConditionModel'; supported"):
        model_class("UNet3DConditionModel")
    for name in MODEL_CLASSES:
        assert model_class(name).diffusers_class == name


def test_describe_model_folder(saved):
    reference, folder = saved["unet"]
    info = describe(folder)
    assert info["path"] == str(folder) and info["format"] == "diffusers model" and info["class"] == "UNet2DModel"
    assert info["parameters"] == sum(math.prod(t.shape) for t in reference.state_dict().values())
    assert info["config"] == {"sample_size": 8, "in_channels": 3, "out_channels": 3}
    assert info["bytes"] == (folder / f"{WEIGHTS}.safetensors").stat().st_size
