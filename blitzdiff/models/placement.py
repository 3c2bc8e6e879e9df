"""Where a model lives: the user's device and dtype arguments, checked before anything is built or read."""

from __future__ import annotations

import torch

DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: torch.device | str | None, *, allow_meta: bool = False) -> torch.device:
    """A torch.device from None (CPU), a string or a device; ValueError when it is malformed, of a type blitzdiff
    does not run on, or a CUDA device this process cannot use."""
    if device is None:
        return torch.device("cpu")
    allowed = (*DEVICE_TYPES, "meta") if allow_meta else DEVICE_TYPES
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in allowed:
        raise ValueError(f"device must be one of {', '.join(allowed)} (or cuda:N), got {device!r}")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"torch {torch.__version__} has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {str(device)!r}: CUDA is not available here ({build}); use device='cpu'")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: this process sees {count} GPU(s), cuda:0..cuda:{count - 1}")
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A floating-point torch.dtype from None (float32), a name ('float16') or a dtype."""
    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype (or its name, e.g. 'float16'), got {dtype!r}")
    return resolved
