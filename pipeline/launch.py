"""Launching the training stages over several processes and machines with torchrun.

`python -m pipeline run baseline` (what dvc.yaml and the Prefect flow run) launches itself under
torchrun when `distributed` asks for more than one process: the same command line, once per
process, each joining the process group (convheads.distributed). The launch is torchrun's own
(torch.distributed.run, called in this process), so the command holding the project folder
(pipeline.lock) is the one that watches the workers; they inherit its hold.
"""
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import List

from convheads import ConvHeadsError
from convheads.data.loaders import cpu_cores
from convheads.precision import resolve_device

from .config import PipelineConfig
from .lock import HELD_BY

TRAINING_STAGES = ("baseline", "recover")


def world_size(cfg: PipelineConfig) -> int:
    return cfg.distributed.nproc_per_node * cfg.distributed.nnodes


def torchrun_args(cfg: PipelineConfig, command: List[str]) -> List[str]:
    """torchrun's arguments for `command` (the arguments after `python -m pipeline`): what a user would type
    after `torchrun`."""
    d = cfg.distributed
    args = [f"--nproc-per-node={d.nproc_per_node}"]
    if d.nnodes == 1:
        args.append("--standalone")  # a free local port, nothing to configure
    else:  # static rendezvous: node_rank 0 hosts it, and its first process is rank 0, the one that writes
        host, port = endpoint(cfg)
        args += [f"--nnodes={d.nnodes}", f"--node-rank={d.node_rank}", f"--master-addr={host}",
                 f"--master-port={port}", f"--rdzv-conf=timeout={d.rdzv_timeout}"]
    return args + ["--max-restarts=0", "-m", "pipeline", *command]


def endpoint(cfg: PipelineConfig):
    host, _, port = cfg.distributed.rdzv_endpoint.rpartition(":")
    return host, int(port)


def check(cfg: PipelineConfig, gpus: int) -> None:
    """What can be checked before launching, with `gpus` CUDA devices on this machine."""
    d = cfg.distributed
    if resolve_device(cfg.device).startswith("cuda") and d.nproc_per_node > gpus:
        raise ConvHeadsError(f"distributed.nproc_per_node={d.nproc_per_node} but this machine has {gpus} GPU"
                             f"{'s' if gpus != 1 else ''}: one process per GPU, so at most {gpus}")
    for name in TRAINING_STAGES:
        t = getattr(cfg, name)
        share = world_size(cfg) * t.accumulation
        if t.batch_size % share:
            raise ConvHeadsError(
                f"{name}.batch_size={t.batch_size} (the global batch of one update) must be a multiple of the "
                f"processes x accumulation steps = {share // t.accumulation} x {t.accumulation}; e.g. "
                f"{name}.batch_size={share * max(1, t.batch_size // share)}")


def check_rendezvous(cfg: PipelineConfig) -> None:
    """Several machines: node 0 must own the endpoint's address; the others must reach it within
    distributed.rdzv_timeout seconds (node 0 may start a little later), else fail, naming it."""
    d = cfg.distributed
    if d.nnodes == 1:
        return
    host, port = endpoint(cfg)
    where = f"distributed.rdzv_endpoint {d.rdzv_endpoint}"
    try:
        socket.getaddrinfo(host, port)
    except OSError as e:
        raise ConvHeadsError(f"{where}: {host} does not resolve ({e}); use node 0's address") from None
    if d.node_rank == 0:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
        except OSError:
            raise ConvHeadsError(f"{where}: node 0 hosts the rendezvous, and {host} is not an address of this "
                                 f"machine ({socket.gethostname()}); use this machine's address, or set "
                                 f"distributed.node_rank to this machine's rank") from None
        return
    deadline, error = time.monotonic() + d.rdzv_timeout, None
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=min(3.0, d.rdzv_timeout)).close()
            return
        except OSError as e:
            error = e.strerror or type(e).__name__
            time.sleep(0.5)
    raise ConvHeadsError(f"{where} cannot be reached from this machine ({error}) within distributed.rdzv_timeout="
                         f"{d.rdzv_timeout} s: start node 0 (distributed.node_rank=0) first, and check the address "
                         f"and that the port is open")


def launch(cfg: PipelineConfig, command: List[str]) -> int:
    """Run `python -m pipeline COMMAND` under torchrun with cfg.distributed; the workers' exit status
    (2 when one failed on bad input, whose message it printed)."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    check(cfg, torch.cuda.device_count())
    check_rendezvous(cfg)
    args = torchrun_args(cfg, command)
    here = cfg.distributed.nproc_per_node
    print(f"launching {here} of {world_size(cfg)} processes on this machine: torchrun {' '.join(args)}",
          file=sys.stderr, flush=True)
    # torchrun would give each process 1 thread (and warn); a fair share of the cores is better.
    threads = str(max(1, cpu_cores() // cfg.distributed.nproc_per_node))
    env = {HELD_BY: str(os.getpid()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a failed worker has said why; torchrun's report would bury it
    # torchrun's agent turns SIGTERM and friends into exceptions; processes forked later from this one
    # (DataLoader workers of the next stages) must not inherit that, or their normal shutdown "fails".
    handlers = ({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        return 2 if 2 in {f.exitcode for f in e.failures.values()} else 1
    finally:
        quiet.setLevel(level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return 0
