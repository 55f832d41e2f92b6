"""Process-group set-up for every launcher: none (one process), torchrun, deepspeed, srun.

The launchers all export the standard RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
(the SLURM templates map SLURM_PROCID etc. onto them); a bare `python launchers/train.py` gets a
one-process group on a free local port. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

# What a launcher sets for each rank; a process that spawns its own trainers must not pass its own on.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> Dist:
    """Join (or create) the default process group; returns this process's place in it."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank = int(os.environ["RANK"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))  # streaming's shared-memory bookkeeping reads it
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if device.type == "cpu":
            skip_cpu_shm_op()
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            rank=rank,
            world_size=world,
        )
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def skip_cpu_shm_op() -> None:
    """On CPU, DeepSpeed JIT-builds a shared-memory all-reduce op when it creates the process group (a C++
    build of tens of seconds the first time on a machine, before the rendezvous). Only DeepSpeed's inference
    all-reduce uses it, never training: marking it unavailable skips the build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over ranks (one collective for the whole list)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (so all ranks take the same branch)."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# What gloo and NCCL put in the errors of a collective whose peer died, hangs, or cannot be reached.
_COMM_FAILURES = (
    "gloo",
    "NCCL",
    "Connection reset",
    "Connection closed",
    "Connection refused",
    "Broken pipe",
    "Timed out",
    "Application timeout",  # gloo, a collective waiting on a hung peer (e.g. the coalesced reduce-scatter)
)


def is_comm_error(exc: BaseException) -> bool:
    """True for a failed collective or rendezvous: another rank died or hung (after `train.dist_timeout_s`)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(key in str(exc) for key in _COMM_FAILURES)
