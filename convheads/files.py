"""Writing files so that a crash or a full disk never leaves a half-written output behind."""
import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from .errors import ConvHeadsError

# A write that failed for lack of room: no space, the file size limit (ulimit -f), the quota.
NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    If the block fails for lack of room (anywhere in its exception chain), the error says so as a
    ConvHeadsError; either way `path` keeps its previous contents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as e:
        full = _no_room(e)
        if full is None:
            raise
        kept = "the previous file is unchanged" if path.exists() else "nothing was written there"
        raise ConvHeadsError(f"could not write {path}: {os.strerror(full.errno)} (the disk is full, or a file size "
                             f"or quota limit was reached); {kept}. Free space on the disk holding {path.parent} "
                             f"and run the same command again") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_torch(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save `obj` to `path` atomically and durably (fsync before the rename).

    It writes through a Python file object: a failed write then carries its OSError (errno), where
    torch's own file writer reports only an internal position mismatch."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def _no_room(error: Optional[BaseException]) -> Optional[OSError]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_ROOM:
            return error
        error = error.__cause__ or error.__context__
    return None
