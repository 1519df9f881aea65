"""Data-parallel training across processes: the process group that torchrun's workers join.

torchrun (torch.distributed.run) starts one process per GPU (or per CPU share) on each machine
and gives each its RANK, LOCAL_RANK and WORLD_SIZE in the environment; `setup` joins the group
(NCCL on GPUs, gloo on CPUs) and pins each process to its GPU. Outside torchrun everything here
answers for a single process, so the same code runs with or without a launcher.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConvHeadsError


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (also before it joined the group: torchrun's RANK); 0 outside a launcher."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes outputs, checkpoints and logs."""
    return rank() == 0


def local_device(device: str) -> str:
    """The device of this process: its own GPU (cuda:LOCAL_RANK) under a launcher on cuda."""
    if torch.device(device).type == "cuda" and launched():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def setup(device: str, timeout_s: float = 1800) -> None:
    """Join the launcher's process group (nothing outside a launcher). NCCL for GPUs, gloo for CPUs."""
    if not launched() or active():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ConvHeadsError(f"process {local} on this machine has no GPU of its own ({torch.cuda.device_count()} "
                                 f"GPUs here); start at most that many processes per machine")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all processes (in place; `t` itself outside a process group)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def same_everywhere(value: int, device: str) -> bool:
    """Whether every process has the same `value` (e.g. the epochs its checkpoint holds); every
    process gets the same answer."""
    if not active():
        return True
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return all_sum(torch.tensor([int(t.item() != value)], device=device)).item() == 0
