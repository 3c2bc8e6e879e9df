import pytest
import torch


@pytest.fixture(autouse=True)
def torch_threads():
    """The jobs (and `blitzdiff sample --out-dir` run in-process) set torch's thread count: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
