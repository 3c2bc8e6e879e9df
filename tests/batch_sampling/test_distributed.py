"""Sharded sampling across processes on 127.0.0.1 (gloo), launched as torchrun launches them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and through torchrun itself: the same samples.npz, byte for byte, from 1, 2
or 3 processes; a killed rank fails the job with a message instead of a hang, and the same command resumes it to
the uninterrupted result; a changed command is refused on every rank."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from blitzdiff.cli import main

N, STEPS, BATCH, SHARD = 24, 20, 3, 4
COMMAND = ["sample", "-n", str(N), "--steps", str(STEPS), "--batch", str(BATCH), "--shard-size", str(SHARD),
           "--no-progress"]
LIMIT_S = 240  # no test here should get near this: a hang fails instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out, *extra: str, out_dirs=None) -> list[subprocess.Popen]:
    """`world` processes of `blitzdiff sample` as torchrun would start them (one torch thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world)}
    return [subprocess.Popen([sys.executable, "-m", "blitzdiff", *COMMAND, "--out-dir",
                              str(out_dirs[rank] if out_dirs else out), *extra],
                             env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for rank in range(world)]


def finish(processes) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        results.append((process.returncode, out, err))
    return results


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, no process group (in this process, the CLI's entry point)."""
    out = tmp_path_factory.mktemp("world1") / "run"
    threads = torch.get_num_threads()
    try:
        assert main([*COMMAND, "--out-dir", str(out)]) == 0  # sets torch's threads to 1 (--threads' default)
    finally:
        torch.set_num_threads(threads)
    return digest(out / "samples.npz")


@pytest.mark.parametrize("world", [2, 3])
def test_world_sizes_give_the_same_samples_npz(one_process, tmp_path, world):
    results = finish(launch(world, tmp_path / "run"))
    assert [code for code, _, _ in results] == [0] * world, results
    assert digest(tmp_path / "run" / "samples.npz") == one_process
    summary = results[0][1]
    assert f"{N} images in" in summary and f"over {world} ranks" in summary
    assert all(f"rank {rank}: " in summary for rank in range(world))
    assert all(out == "" for _, out, _ in results[1:])  # one summary, from rank 0


def test_through_torchrun(one_process, tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "blitzdiff", *COMMAND, "--out-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=LIMIT_S)
    assert run.returncode == 0, run.stderr
    assert digest(tmp_path / "run" / "samples.npz") == one_process


def test_a_killed_rank_fails_the_job_and_the_same_command_resumes_it(one_process, tmp_path):
    out = tmp_path / "run"
    processes = launch(2, out, "--timeout", "5")
    deadline = time.monotonic() + LIMIT_S
    while not (out / "shard-00001.npz").exists() and time.monotonic() < deadline:  # rank 1's first shard
        time.sleep(0.005)
    processes[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    (code, _, err), (killed, _, _) = finish(processes)
    assert killed == -signal.SIGKILL
    assert code == 2 and "rank 1 made no progress in 5 s (died or hung" in err, err
    assert "the complete shards are kept: run the same command again" in err
    assert time.monotonic() - started < 60
    shards = sorted(p.name for p in out.glob("shard-*.npz"))
    assert "shard-00001.npz" in shards and len(shards) < N // SHARD  # rank 1 died with shards to do
    assert not (out / "samples.npz").exists()

    results = finish(launch(3, out))  # the same command, another world size
    assert [c for c, _, _ in results] == [0, 0, 0], results
    assert f"({len(shards)} complete shards skipped)" in results[0][1]
    assert digest(out / "samples.npz") == one_process


def test_a_changed_command_is_refused_on_every_rank(tmp_path):
    out = tmp_path / "run"
    assert main([*COMMAND, "--out-dir", str(out), "-n", "4", "--shard-size", "4", "--steps", "2"]) == 0
    results = finish(launch(2, out, "-n", "4", "--shard-size", "4", "--steps", "3"))
    for rank, (code, _, err) in enumerate(results):
        assert code == 2 and f"(rank {rank}): error: the folder holds samples of another command (steps: 3 now, 2 in " \
            "the folder)" in err, err


def test_every_rank_must_see_one_folder(tmp_path):
    results = finish(launch(2, None, "-n", "4", out_dirs=[tmp_path / "a", tmp_path / "b"]))
    for code, _, err in results:
        assert code == 2 and f"rank 1: {tmp_path / 'b' / 'manifest.json'} is not the one rank 0 just wrote: " \
            "--out-dir must name one folder all ranks share" in err, err
