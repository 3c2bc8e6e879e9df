"""Shared pytest hooks."""

import pytest
import torch


def pytest_runtest_setup(item):
    # `cuda` tests (marker declared in pyproject.toml) skip with the reason where no GPU is usable; checked per test
    # at run time, so collecting the suite never queries a device.
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
