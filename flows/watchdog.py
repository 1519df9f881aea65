"""`python -m flows.watchdog PARENT CHILD`: end process CHILD once process PARENT is gone.

A flow's command line starts a temporary Prefect server as its child; a command killed with
kill -9 cannot stop it, so this watchdog, started beside the server, does: it waits for its own
parent (the command) to die, then sends the server SIGTERM, and SIGKILL 5 s later if it still
runs. On Linux the server is held by a pidfd from the start, so a recycled pid is never hit.
"""
import os
import select
import signal
import sys
import time

POLL_S = 0.2
GRACE_S = 5.0


def _signal(child: int, fd, sig: int) -> None:
    try:
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(child, sig)
    except ProcessLookupError:
        pass


def _gone(child: int, fd, timeout: float) -> bool:
    if fd is not None:  # readable once the process has exited
        return bool(select.select([fd], [], [], timeout)[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        time.sleep(POLL_S)
    return False


def watch(parent: int, child: int) -> None:
    fd = os.pidfd_open(child) if hasattr(os, "pidfd_open") else None
    while os.getppid() == parent:  # reparented once the parent has died
        if _gone(child, fd, POLL_S):  # the server ended on its own (the command stopped it)
            return
    _signal(child, fd, signal.SIGTERM)
    if not _gone(child, fd, GRACE_S):
        _signal(child, fd, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the command's to handle
    try:
        watch(int(sys.argv[1]), int(sys.argv[2]))
    except ProcessLookupError:  # the server is gone already
        pass
