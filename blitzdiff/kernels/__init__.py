"""Fused kernels, one op per module: `<op>_ref` (the PyTorch spec) beside the op that dispatches to a backend."""

from .adaln_modulate import adaln_gated_residual, adaln_gated_residual_ref, adaln_modulate, adaln_modulate_ref
from .attention import attention, attention_ref
from .gaussian_noise import gaussian_noise, gaussian_noise_ref
from .gelu import gelu_tanh, gelu_tanh_ref
from .group_norm import group_norm, group_norm_ref
from .solver_step import solver_step, solver_step_ref
from .solver_update import solver_update, solver_update_ref
from .timestep_embedding import timestep_embedding, timestep_embedding_ref, timestep_mlp, timestep_mlp_ref

__all__ = [
    "adaln_gated_residual", "adaln_gated_residual_ref", "adaln_modulate", "adaln_modulate_ref", "attention",
    "attention_ref", "gaussian_noise", "gaussian_noise_ref", "gelu_tanh", "gelu_tanh_ref",
    "group_norm", "group_norm_ref", "solver_step", "solver_step_ref", "solver_update", "solver_update_ref",
    "timestep_embedding", "timestep_embedding_ref", "timestep_mlp", "timestep_mlp_ref",
]
