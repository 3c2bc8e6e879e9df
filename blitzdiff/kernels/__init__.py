"""Fused kernels, one op per module: `<op>_ref` (the PyTorch spec) beside the op that dispatches to a backend."""

from .solver_update import solver_update, solver_update_ref

__all__ = ["solver_update", "solver_update_ref"]
