"""Fused kernels, one op per module: `<op>_ref` (the PyTorch spec) beside the op that dispatches to a backend."""

from .gaussian_noise import gaussian_noise, gaussian_noise_ref
from .solver_update import solver_update, solver_update_ref

__all__ = ["gaussian_noise", "gaussian_noise_ref", "solver_update", "solver_update_ref"]
