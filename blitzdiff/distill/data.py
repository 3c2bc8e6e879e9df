"""Training images for distillation: an .npz / .npy array, a folder of PNGs, or (None) the shipped digits.

Every source comes out the same way: float32 images [N, C, H, W] in [-1, 1] (the pixel range the models are trained
in), resized to the model's sample size and converted to its channel count, plus int64 labels [N] when the teacher is
class-conditional.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_KEYS = ("images", "arr_0")  # our own .npz layout, then ADM's (openai/guided-diffusion reference batches)
LABEL_KEYS = ("labels", "arr_1")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses


def load_images(path: str | Path | None, *, channels: int, size: int | tuple[int, int],
                class_conditional: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [N, channels, H, W] float32 in [-1, 1], labels [N] int64 or None when not class_conditional).

    path: None (the digits train split, blitzdiff.quality.load_digits), an .npz holding "images" (and "labels") or
    ADM's arr_0 (and arr_1), an .npy of images, or a folder of PNGs (searched recursively; with class_conditional each
    PNG's label is the name of its parent folder, an integer: DIR/3/a.png is a 3). Arrays are uint8 in [0, 255] or
    float in [-1, 1], laid out [N, H, W], [N, H, W, C] (ADM) or [N, C, H, W]. Images are resized (bilinear,
    antialiased; PNGs with PIL) to size, (H, W) or an int H = W; 1 <-> 3 channels are converted (gray repeated /
    luminance), RGBA drops its alpha.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if path is None:
        from ..quality import load_digits

        images, labels = load_digits("train")
        return _finish(images, labels if class_conditional else None, channels, size, "the digits train split")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path {path} does not exist; pass an .npz, an .npy, a folder of PNGs, or None for "
                         "the shipped digits")
    if path.is_dir():
        images, labels = _png_folder(path, size, class_conditional)
    elif path.suffix == ".npz":
        with np.load(path) as data:
            image_key = next((k for k in IMAGE_KEYS if k in data.files), None)
            if image_key is None:
                raise ValueError(f"{path}: no image array; expected one of {IMAGE_KEYS}, found {data.files}")
            label_key = next((k for k in LABEL_KEYS if k in data.files), None)
            images = _array_images(data[image_key], path)
            labels = None if label_key is None else torch.from_numpy(data[label_key].astype(np.int64))
    elif path.suffix == ".npy":
        images, labels = _array_images(np.load(path), path), None
    else:
        raise ValueError(f"{path}: unsupported data file; allowed: .npz, .npy, a folder of PNGs")
    if class_conditional and labels is None:
        raise ValueError(f"{path}: the teacher is class-conditional but the data has no labels (an .npz with "
                         "'labels' or arr_1, or PNGs in folders named by their class)")
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"{path}: {len(images)} images but labels of shape {tuple(labels.shape)}")
    return _finish(images, labels if class_conditional else None, channels, size, str(path))


def _array_images(array: np.ndarray, path: Path) -> torch.Tensor:
    """An image array -> float32 [N, C, H, W] in [-1, 1]."""
    if array.ndim == 3:
        array = array[..., None]  # [N, H, W] -> [N, H, W, 1]
    if array.ndim != 4:
        raise ValueError(f"{path}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got {array.shape}")
    if array.shape[-1] <= 4:
        array = array.transpose(0, 3, 1, 2)  # channels last (ADM's layout) -> channels first
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) * (2.0 / 255.0) - 1.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: images must be uint8 in [0, 255] or float in [-1, 1], got {array.dtype}")
    low, high = float(array.min()), float(array.max())
    if low < -1.001 or high > 1.001:
        raise ValueError(f"{path}: float images must lie in [-1, 1], got [{low:g}, {high:g}] (pass uint8 for "
                         "[0, 255] pixels)")
    return torch.from_numpy(array.astype(np.float32))


def _png_folder(folder: Path, size: tuple[int, int],
                class_conditional: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    if not files:
        raise ValueError(f"{folder}: no .png files in this folder (searched recursively)")
    images, labels = [], []
    for file in files:
        with Image.open(file) as image:
            image = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else
                                  "L" if image.mode in ("L", "1", "I", "I;16") else "RGB")
            images.append(np.asarray(image.resize((size[1], size[0]), Image.BILINEAR)))
        if class_conditional:
            name = file.parent.name
            if file.parent == folder or not name.isdigit():
                raise ValueError(f"{file}: the teacher is class-conditional, so each PNG must sit in a folder named "
                                 f"by its integer class (e.g. {folder}/3/{file.name})")
            labels.append(int(name))
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"{folder}: PNGs mix grayscale, RGB and RGBA; convert them to one mode")
    batch = torch.from_numpy(np.stack(images).astype(np.float32) * (2.0 / 255.0) - 1.0)
    batch = batch[..., None] if batch.dim() == 3 else batch  # [N, H, W(, C)] -> [N, H, W, C]
    return batch.permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.int64) if labels else None


def _finish(images: torch.Tensor, labels: torch.Tensor | None, channels: int, size: tuple[int, int],
            source: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Channel conversion and resizing of [N, C, H, W] in [-1, 1]."""
    if len(images) == 0:
        raise ValueError(f"{source}: no images")
    have = images.shape[1]
    if have == 4 and channels != 4:
        images, have = images[:, :3], 3  # RGBA: drop the alpha
    if have == 3 and channels == 1:
        images = torch.einsum("nchw,c->nhw", images, torch.tensor(LUMA))[:, None]
    elif have == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif have != channels:
        raise ValueError(f"{source}: images have {have} channels and the model takes {channels}; convertible: "
                         "1 <-> 3 channels, RGBA -> 3 or 1")
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return images.float().contiguous(), labels
