"""Backend names shared by the kernels: each op lists the backends it has; asking for another is a clear error."""

ALL_BACKENDS = ("ref", "triton", "cuda", "cpu")


def check_backend(op: str, backend: str, available: tuple[str, ...]) -> None:
    """Raise ValueError unless `op` has `backend`."""
    if backend not in available:
        known = "" if backend in ALL_BACKENDS else f" (backends are {', '.join(ALL_BACKENDS)})"
        raise ValueError(f"{op}: no backend {backend!r}{known}; this build of {op} has: {', '.join(available)}")
