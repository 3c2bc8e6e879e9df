"""The processes of a data-parallel job as torchrun (or any launcher setting RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT) starts them. Only small control messages cross processes (the shard list, errors, the
summary), over gloo on the CPU; on GPUs the group is "cpu:gloo,cuda:nccl", so CUDA tensors would go over NCCL. Every
collective has the job's timeout: a rank that dies or hangs fails the job instead of hanging it."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch


class JobRefused(ValueError):
    """Raised on every rank alike (bad arguments, a changed command, an unshared folder): all ranks are alive and
    agree, so they can leave the job together."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False  # a process group was started (world size > 1)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(values, value)
        return values

    def agree(self, error: str | None) -> None:
        """Raise on every rank when any rank has an error (so that no rank goes on to wait for the failed ones)."""
        errors = [f"rank {rank}: {e}" if self.size > 1 else e for rank, e in enumerate(self.gather(error)) if e]
        if errors:
            raise JobRefused("; ".join(errors))

    def close(self, together: bool) -> None:
        """Leave the job. together: every rank gets here (the job ended or was refused on all ranks): a barrier, then
        the group is destroyed (no rank tears its connections down while another still uses them). Otherwise a
        rank failed: leave the group to the process's exit (a barrier would wait for the failed rank, and destroying
        it while a peer is mid-teardown can abort the process)."""
        if together and self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def environment_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without one."""
    try:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as error:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({error})") from error
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK {rank} / WORLD_SIZE {size}: need 0 <= RANK < WORLD_SIZE")
    return rank, size, local_rank


def rank_device(requested: str) -> torch.device:
    """This rank's device: a bare "cuda" means cuda:LOCAL_RANK (one GPU per process), anything else as given."""
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", environment_rank()[2])
    return device


def join(device_type: str, timeout_s: float) -> World:
    """This process's place in the job: a process group when WORLD_SIZE > 1 (its rendezvous and every collective
    time out after timeout_s), else a world of one. Join after loading the model: a process that loaded it after
    starting a gloo group sometimes aborted at exit (1 in 25 under CPU load, torch 2.13; never in 140 runs in this
    order)."""
    rank, size, local_rank = environment_rank()
    if size == 1:
        return World()
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE {size} without {' and '.join(missing)}: start the job with torchrun "
                         "(torchrun --nproc-per-node K -m blitzdiff sample ...)")
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend, rank=rank, world_size=size,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, size, local_rank, True)
