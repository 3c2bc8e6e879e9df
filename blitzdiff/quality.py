"""Sample quality of the embedded digit models, on CPU in seconds: a Frechet distance and a class accuracy.

The data is scikit-learn's digits upsampled to 16x16 (`blitzdiff/assets/digits.npz`, written once by
`scripts/prepare_digits.py`). The "judge" is a small CNN classifier trained by this project on the train split
(`scripts/train_default_models.py`); its weights ship as `blitzdiff/assets/digits_judge.safetensors`. Its
penultimate layer is the feature space of the Frechet distance, as Inception-v3's pool layer is FID's (Heusel et
al. 2017, arXiv:1706.08500): for images far from ImageNet, a feature space trained on the same data is the one
that sees what matters (the Frechet "LeNet" distance of MNIST papers does the same).

    images, labels = load_digits("heldout")      # [300, 1, 16, 16] in [-1, 1], [300]
    evaluate(samples, class_labels)              # {"fd": ..., "accuracy": ..., "class_counts": [...], "n": ...}
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

ASSETS = Path(__file__).parent / "assets"
DIGITS_PATH = ASSETS / "digits.npz"
JUDGE_PATH = ASSETS / "digits_judge.safetensors"
SPLITS = ("train", "heldout")
NUM_CLASSES = 10
# Samples slightly past [-1, 1] (an unclipped sampler) are clamped, as an image pipeline's final clamp does;
# values past this bound mean the tensor is not in model-space pixels at all (e.g. [0, 255]).
RANGE_LIMIT = 2.0
BATCH = 1024


class DigitsJudge(nn.Module):
    """A LeNet-style classifier of 16x16 digits: two conv stages (16 -> 8 -> 4), a 64-d feature layer, 10 logits.

    The feature layer is SiLU, not ReLU: with ReLU half of its units died in training (constant 0 features that
    the Frechet distance cannot use); SiLU keeps all of them alive and gave the better held-out accuracy.
    """

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)
        self.dropout = nn.Dropout(0.3)  # active in training only: features of eval mode are deterministic

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)  # [B, 32, 8, 8]
        h = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(h)))), 2)  # [B, 64, 4, 4]
        return F.silu(self.fc(h.flatten(1)))  # [B, 64]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # [B, 10] logits


@functools.cache
def _digits_file() -> dict[str, np.ndarray]:
    with np.load(DIGITS_PATH) as data:
        return {key: data[key] for key in data.files}


def load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16x16 digits of one split: (images [N, 1, 16, 16] float32 in [-1, 1], labels [N] int64)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = _digits_file()
    index = data[split].astype(np.int64)
    images = torch.from_numpy(data["images"][index].astype(np.float32) * (2.0 / 255.0) - 1.0)[:, None]
    return images, torch.from_numpy(data["labels"][index].astype(np.int64))


@functools.cache
def judge() -> DigitsJudge:
    """The shipped judge, in eval mode (loaded once)."""
    model = DigitsJudge()
    model.load_state_dict(load_file(JUDGE_PATH))
    return model.eval().requires_grad_(False)


def _check_images(images: torch.Tensor, name: str = "images", min_count: int = 1) -> torch.Tensor:
    """Validate [N, 1, 16, 16] model-space images; return them as float32 on CPU, clamped to [-1, 1]."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor [N, 1, 16, 16], got {type(images).__name__}"
                         + (f" of dtype {images.dtype}" if isinstance(images, torch.Tensor) else ""))
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 16, 16) or images.shape[0] < min_count:
        raise ValueError(f"{name} must have shape [N, 1, 16, 16] with N >= {min_count}, got {tuple(images.shape)}")
    images = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = images.min().item(), images.max().item()
    if lo < -RANGE_LIMIT or hi > RANGE_LIMIT:
        raise ValueError(f"{name} must be model-space pixels in [-1, 1] (values up to +-{RANGE_LIMIT} are clamped); "
                         f"got range [{lo:.3g}, {hi:.3g}]: map [0, 1] images with x * 2 - 1")
    return images.clamp(-1.0, 1.0)


def _check_labels(labels: torch.Tensor, count: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != (count,):
        raise ValueError(f"labels must be an integer tensor of shape [{count}] (one per image), got "
                         + (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                            else type(labels).__name__))
    labels = labels.to("cpu", torch.int64)
    if count and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be class indices in [0, {NUM_CLASSES}), got [{labels.min()}, {labels.max()}]")
    return labels


@torch.inference_mode()
def _judge_outputs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 64], logits [N, 10]) of checked images, in batches."""
    model = judge()
    feats = torch.cat([model.features(chunk) for chunk in images.split(BATCH)])  # [N, 64]
    return feats, model.head(feats)


def features(images: torch.Tensor) -> torch.Tensor:
    """The judge's penultimate layer: [N, 1, 16, 16] images in [-1, 1] -> [N, 64] float32."""
    return _judge_outputs(_check_images(images))[0]


def feature_statistics(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    assert feats.dim() == 2 and feats.shape[0] >= 2
    feats = feats.to(torch.float64)
    return feats.mean(0), torch.cov(feats.T)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; eigenvalues below 0 are rounding, clipped."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_from_statistics(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^1/2), all in float64.

    tr((C1 C2)^1/2) = tr((C1^1/2 C2 C1^1/2)^1/2): the second form is symmetric PSD, so two eigen-decompositions
    give it exactly where scipy's sqrtm of the non-symmetric product needs a Schur form and may go complex.
    """
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt)


def frechet_distance(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Frechet distance between two image sets [N, 1, 16, 16] (N >= 2 each) in the judge's feature space."""
    stats = [feature_statistics(_judge_outputs(_check_images(x, name, min_count=2))[0])
             for x, name in ((images, "images"), (reference, "reference"))]
    return frechet_distance_from_statistics(*stats[0], *stats[1])


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images that the judge classifies as their label."""
    images = _check_images(images)
    labels = _check_labels(labels, images.shape[0])
    return float((_judge_outputs(images)[1].argmax(1) == labels).double().mean())


@functools.cache
def _heldout_statistics() -> tuple[torch.Tensor, torch.Tensor]:
    return feature_statistics(_judge_outputs(load_digits("heldout")[0])[0])


def evaluate(images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Quality of generated images [N, 1, 16, 16] in [-1, 1] against the held-out split.

    Returns {"fd": Frechet distance to the held-out features, "class_counts": the judge's predicted class
    histogram (coverage of the 10 classes), "n": N} and, with labels (the classes the samples were conditioned on),
    "accuracy": the fraction the judge classifies as their label. The reference point is real data:
    FD(held-out, train) and the judge's held-out accuracy (see scripts/train_default_models.py).
    """
    images = _check_images(images, min_count=2)
    feats, logits = _judge_outputs(images)
    predicted = logits.argmax(1)
    result = {"fd": frechet_distance_from_statistics(*feature_statistics(feats), *_heldout_statistics()),
              "class_counts": torch.bincount(predicted, minlength=NUM_CLASSES).tolist(), "n": images.shape[0]}
    if labels is not None:
        result["accuracy"] = float((predicted == _check_labels(labels, images.shape[0])).double().mean())
    return result
