"""graphs.Pool's rule, without a GPU: captures share one pool handle while a graph captured into it lives, and start
a new one once every such graph is gone (recapturing into a pool whose graphs are all dead fails an allocator assert
on torch 2.11, seen on an H200). The CUDA side (capture, replay, eviction) is tested in test_runtime.py's cuda tests."""

import gc
import itertools

import pytest

from blitzdiff.engine import graphs


class Graph:  # stands in for torch.cuda.CUDAGraph: only its lifetime matters here
    pass


@pytest.fixture
def handles(monkeypatch):
    counter = itertools.count()
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: (0, next(counter)))


def test_pool_is_shared_while_a_graph_lives(handles):
    pool = graphs.Pool()
    first = pool.for_capture()
    a, b = Graph(), Graph()
    pool.graphs.add(a)
    assert pool.for_capture() == first
    pool.graphs.add(b)
    del a
    gc.collect()
    assert pool.for_capture() == first  # b still lives in it
    del b
    gc.collect()
    assert pool.for_capture() != first
