"""Triton kernels, one op per module; imported only when an op's "triton" backend is asked for (triton is optional)."""
