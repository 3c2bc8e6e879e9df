"""pytest hooks of the benchmark suites (`python -m pytest benchmarks`); the root conftest.py (TRITON_INTERPRET
without a GPU, `cuda` cases skipped without one) applies here too. Added here: the torch.compile'd systems are
opt-in (`--compile`), because their builds take seconds to minutes per shape (about 5-40 s each for the embedded
models on CPU).
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--compile", action="store_true",
                     help="also run the benchmark cases marked `compile` (blitzdiff's compile mode, diffusers + "
                          "torch.compile): slow to build")


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: builds with torch.compile; runs only with --compile")


def pytest_runtest_setup(item):
    if item.get_closest_marker("compile") is not None and not item.config.getoption("--compile"):
        pytest.skip("torch.compile builds are slow: pass --compile to run this case")
