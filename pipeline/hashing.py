"""Short, stable names for configurations and files: what fingerprints and tags are made of."""
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from convheads.data.manifest import file_sha256


def short_hash(data: Any) -> str:
    """16 hex digits of the SHA-256 of `data` as canonical JSON (sorted keys): equal data, equal hash."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path) -> str:
    """SHA-256 of a file's contents, computed once per (size, mtime) of the file in this process."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))
