"""pytest hooks of the benchmark suites (`python -m pytest benchmarks`).

tests/conftest.py does not apply here (pytest reads conftest files along the collected paths only), so its two
hooks are mirrored: TRITON_INTERPRET=1 where no CUDA GPU is usable, set before anything imports Triton (diffusers
does), and `cuda` cases skip without a GPU. Added here: the torch.compile'd systems are opt-in (`--compile`),
because their builds take seconds to minutes per shape (about 5-40 s each for the embedded models on CPU).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption("--compile", action="store_true",
                     help="also run the benchmark cases marked `compile` (blitzdiff's compile mode, diffusers + "
                          "torch.compile): slow to build")


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: builds with torch.compile; runs only with --compile")


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    if item.get_closest_marker("compile") is not None and not item.config.getoption("--compile"):
        pytest.skip("torch.compile builds are slow: pass --compile to run this case")
