"""One run at a time per project folder, and one promotion at a time per registry store.

A run holds an exclusive lock (a POSIX record lock, fcntl.lockf) on its outputs folder and its
data folder for as long as it runs stages or logs them; a second run on the same folders fails at
once, naming the run that holds them (pid, host, start time, command). The lock file holds that
description while it is held. The kernel drops the lock when its process dies, even by `kill -9`,
so a crashed run never blocks the next one. A record lock belongs to the process alone: the
children it forks (DataLoader workers) do not inherit it, so they cannot keep a killed run's lock
(flock would let them). Give each machine its own project folder: locks on a network filesystem
are only as good as its lock manager.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from convheads import ConvHeadsError

from .config import PipelineConfig


def lock_file(folder) -> Path:
    """The lock of `folder`: a hidden file beside it (the folder itself may be swapped whole)."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


_HELD = set()  # lock files this process holds: taking one again (a flow inside its command line) holds on


@contextlib.contextmanager
def exclusive(path: Path, holder: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock file `path`, waiting at most `wait` seconds for another holder; raise
    TimeoutError(description of the holder) if it is still held then."""
    if path in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # no O_TRUNC: the holder's description stays
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(_describe(path)) from None
                time.sleep(0.2)
        argv = getattr(sys, "orig_argv", sys.argv)  # as typed: python -m flows.compress ...
        record = {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": " ".join([Path(argv[0]).name, *argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
            os.ftruncate(fd, 0)
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _describe(path: Path) -> str:
    try:
        r = json.loads(path.read_text())
        return f"{r['holder']} (pid {r['pid']} on {r['host']}, started {r['started']}: {r['command']})"
    except (OSError, ValueError, KeyError):
        return "another run (it has just started)"


@contextlib.contextmanager
def hold(cfg: PipelineConfig, holder: str) -> Iterator[None]:
    """Hold the outputs and data folders of `cfg` for this run, or fail at once naming their holder."""
    with contextlib.ExitStack() as stack:
        for key, folder in (("paths.outputs", cfg.paths.outputs), ("paths.data", cfg.paths.data)):
            try:
                stack.enter_context(exclusive(lock_file(folder), holder))
            except TimeoutError as e:
                raise ConvHeadsError(
                    f"{folder} ({key}) is in use by {e}. Wait for that run to finish (or stop it), or run this "
                    f"one in folders of its own: paths.outputs=<folder> paths.data=<folder>") from None
        yield



# Set by pipeline.launch for its torchrun workers: the pid of the launcher that holds the folders for them.
HELD_BY = "CONVHEADS_FOLDERS_HELD_BY"


@contextlib.contextmanager
def held_by_launcher(cfg: PipelineConfig, holder: str) -> Iterator[None]:
    """In a torchrun worker: the folders are held by the launcher that started it (checked: the
    lock's record names that pid); a worker started by hand under torchrun holds them from rank 0.
    On machines other than node 0 nothing is held: they share node 0's folders (a shared
    filesystem), where node 0's run holds them, and write nothing there."""
    pid = os.environ.get(HELD_BY)
    if cfg.distributed.node_rank > 0:
        yield
    elif pid is not None:
        for folder in (cfg.paths.outputs, cfg.paths.data):
            try:
                record = json.loads(lock_file(folder).read_text())
            except (OSError, ValueError):
                record = {}
            if str(record.get("pid")) != pid:
                raise ConvHeadsError(f"{folder} is not held by the launcher (pid {pid}) that started this process; "
                                     f"start the stage as python -m pipeline run ...")
        yield
    elif int(os.environ.get("RANK", "0")) == 0:
        with hold(cfg, holder):
            yield
    else:
        yield
