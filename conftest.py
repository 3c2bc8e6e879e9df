"""pytest hooks shared by the tests (tests/) and the benchmark suites (benchmarks/): this file sits above both.

Triton runs compiled on a usable CUDA GPU, else in its CPU interpreter: TRITON_INTERPRET=1 is set here, in the
repository's root conftest, because Triton reads it when it is first imported (its language functions are decorated for
the interpreter or the compiler then), and test modules anywhere in the tree may import it indirectly while being
collected (diffusers does). On a GPU the variable is left as it is. Tests read the mode through
blitzdiff.kernels._backends.triton_interpreted().
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_runtest_setup(item):
    # `cuda` tests (marker declared in pyproject.toml) skip with the reason where no GPU is usable; checked per test
    # at run time, so collecting the suite never queries a device.
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    # `tensorrt` tests need the tensorrt extra (which cannot be installed on this project's machines) and a GPU.
    if item.get_closest_marker("tensorrt") is not None:
        missing = [name for name in ("tensorrt", "polygraphy") if importlib.util.find_spec(name) is None]
        if missing or not torch.cuda.is_available():
            reason = f"{', '.join(missing)} not installed" if missing else "torch.cuda.is_available() is False"
            pytest.skip(f'needs TensorRT, polygraphy and a CUDA GPU ({reason}): pip install "blitzdiff[tensorrt]"')
