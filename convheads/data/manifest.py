"""Datasets versioned in place: a manifest of every image, built without copying any.

The manifest (CSV) has one row per image: its path relative to the dataset's root folder, label
(index into the class list), class, split, size in bytes and the SHA-256 of its bytes. The data
version is the SHA-256 of the manifest file: the same images with the same labels and splits give
the same version wherever the folder lives.

Layouts (`scan_folder`, `scan_csv`):

    <root>/<class>/<image>                      splits carved out of all images (see below)
    <root>/{train,val,test}/<class>/<image>     as given; a missing val/ or test/ is carved from train/
    <root>/{train,val}/<class>/<image>          ImageNet's: val/ becomes the test split (the images
                                                results are reported on); val is carved from train/
    a CSV with columns path,label[,split]       paths relative to the CSV's folder; same rules

Images may sit in subfolders of their class folder. Files that are not images (by suffix) and
hidden files are skipped. Carving: each image's path and the seed hash to a number u in [0, 1);
test takes u < test_fraction, val the next val_fraction. Adding images never moves an existing
image to another split, so a grown dataset's test images were never trained on.

Hashing (`build_manifest`): a cache of (absolute path, size, mtime) -> hash (SQLite) means that a
rerun reads only new or changed files, and an interrupted run keeps what it hashed. Every file
read is also checked as an image to the end of its pixel data (convheads.data.check_image), so a
corrupt file fails here, named, not hours into training.
"""
import contextlib
import csv
import hashlib
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pandas as pd
from tqdm.auto import tqdm

from ..errors import ConvHeadsError
from .images import IMAGE_SUFFIXES, SPLITS, check_image

MANIFEST_COLUMNS = ("path", "label", "class", "split", "size", "sha256")
CHUNK = 512          # files per round trip to the cache and the hashing processes
SHOWN = 10           # bad files named in one error message


@dataclass(frozen=True)
class Item:
    path: str                # relative to the root, with "/"
    cls: str
    origin: Optional[str]    # the split it was given (folder or CSV column), None if none


@dataclass
class Source:
    """A dataset as found: its root, class list, layout and a way to list its images (again)."""
    root: Path
    classes: List[str]
    layout: str
    given_splits: Tuple[Optional[str], ...]   # the splits the source names (None: no split given)
    items: Callable[[], Iterator[Item]]
    extra_files: List[Path] = field(default_factory=list)   # e.g. the CSV: part of the listing too
    ignored: int = 0          # non-image files skipped, counted while listing


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _walk(folder: Path) -> Iterator[os.DirEntry]:
    """Files under `folder`, recursively, in sorted order; hidden files and folders skipped."""
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        if e.is_dir():
            yield from _walk(Path(e.path))
        elif e.is_file():
            yield e


def _subfolders(folder: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan_folder(root: Path, classes: Optional[List[str]] = None) -> Source:
    """A class-per-subfolder image folder, flat or split into train/ val/ test/ (see module doc)."""
    root = Path(root)
    if not root.is_dir():
        raise ConvHeadsError(f"{root} is not a folder; point data.path at a class-per-subfolder image folder")
    top = _subfolders(root)
    given = [s for s in SPLITS if s in top]
    if given:
        others = [d for d in top if d not in SPLITS]
        if others:
            raise ConvHeadsError(f"{root} has split folders ({', '.join(given)}) and also {', '.join(others)}; put "
                                 f"every class folder under train/, val/ or test/, or use a flat <class>/ layout")
        if "train" not in given:
            raise ConvHeadsError(f"{root} has {', '.join(given)}/ but no train/ folder; add one")
        bases: Dict[Optional[str], Path] = {s: root / s for s in given}
    else:
        bases = {None: root}
    for split, base in bases.items():
        loose = next((e.name for e in os.scandir(base) if e.is_file() and _is_image(e.name)), None)
        if loose is not None:
            raise ConvHeadsError(
                f"{base} holds images directly ({loose}, ...), not in class folders"
                + (" (ImageNet's raw validation layout)" if split else "") + ": sort them into <class>/ folders, "
                "or list them with their labels in a CSV (path,label[,split]) and use data.source=csv")
    found = {split: _subfolders(base) for split, base in bases.items()}
    train_split = "train" if given else None
    if not found[train_split]:
        raise ConvHeadsError(f"{bases[train_split]} has no class folders "
                             f"(expected {bases[train_split]}/<class>/<image>)")
    classes = list(classes) if classes else found[train_split]
    known = set(classes)
    for split, names in found.items():
        outside = [n for n in names if n not in known]
        if outside:
            raise ConvHeadsError(
                f"{bases[split]} has class folders outside the class list: {', '.join(outside[:SHOWN])}; "
                + ("add them to data.classes or remove them" if known != set(found[train_split]) else
                   f"every class needs training images in {bases[train_split]}/<class>/ (or list the classes in "
                   f"data.classes)"))
    for split, names in found.items():  # up front (a directory listing each), so a preflight catches it
        for name in names:
            if not any(_is_image(e.name) for e in _walk(bases[split] / name)):
                raise _empty_class(bases[split] / name)
    source = Source(root, classes, "split folders" if given else "class folders", tuple(bases), lambda: iter(()))

    def items() -> Iterator[Item]:
        source.ignored = 0
        for split, base in bases.items():
            for name in found[split]:
                n = 0
                for entry in _walk(base / name):
                    if _is_image(entry.name):
                        n += 1
                        yield Item(Path(entry.path).relative_to(root).as_posix(), name, split)
                    else:
                        source.ignored += 1
                if n == 0:  # emptied since the scan
                    raise _empty_class(base / name)

    source.items = items
    return source


def _empty_class(folder: Path) -> ConvHeadsError:
    return ConvHeadsError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images or "
                          f"remove the folder")


def _sorted_labels(labels) -> List[str]:
    """Class names in order: numerically if they are all integers (so 10 comes after 9)."""
    labels = list(labels)
    return sorted(labels, key=int) if all(label.lstrip("-").isdigit() for label in labels) else sorted(labels)


def _read_csv(path: Path, **kwargs):
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, **kwargs)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ConvHeadsError(f"cannot read {path} as a CSV ({e}); expected columns path,label[,split]") from None


def scan_csv(path: Path, classes: Optional[List[str]] = None, chunksize: int = 100_000) -> Source:
    """A CSV of (path, label[, split]) rows; paths relative to the CSV's folder (or absolute)."""
    path = Path(path)
    if not path.is_file():
        raise ConvHeadsError(f"{path} is not a file; point data.path at a CSV with columns path,label[,split]")
    columns = list(_read_csv(path, nrows=0).columns)
    if "path" not in columns or "label" not in columns:
        raise ConvHeadsError(f"{path} has columns {', '.join(columns) or '(none)'}; it needs path and label "
                             f"(and optionally split: train, val or test)")
    has_split = "split" in columns
    usecols = ["path", "label"] + (["split"] if has_split else [])
    labels, splits = set(), set()
    for chunk in _read_csv(path, usecols=usecols, chunksize=chunksize):
        labels.update(chunk.label)
        if has_split:
            splits.update(chunk.split)
    if not labels:
        raise ConvHeadsError(f"{path} lists no images")
    bad_splits = sorted(s for s in splits if s not in (*SPLITS, ""))
    if bad_splits:
        raise ConvHeadsError(f"{path}: split values must be train, val, test or empty; found {', '.join(bad_splits)}")
    classes = list(classes) if classes else _sorted_labels(labels)
    known = set(classes)
    outside = sorted(labels - known)
    if outside:
        raise ConvHeadsError(f"{path} has labels outside the class list: {', '.join(outside[:SHOWN])}"
                             f"{' ...' if len(outside) > SHOWN else ''}; add them to data.classes or fix the rows")
    given = tuple(s for s in SPLITS if s in splits) + ((None,) if not has_split or "" in splits else ())
    if has_split and "train" not in splits and "" not in splits:
        raise ConvHeadsError(f"{path} has no rows with split train (nor empty); add training images")
    root = path.parent

    def items() -> Iterator[Item]:
        for chunk in _read_csv(path, usecols=usecols, chunksize=chunksize):
            for row in chunk.itertuples(index=False):
                rel = row.path if not os.path.isabs(row.path) else os.path.relpath(row.path, root)
                yield Item(Path(rel).as_posix(), row.label, (row.split or None) if has_split else None)

    return Source(root, classes, "csv", given, items, extra_files=[path])


class HashCache:
    """(absolute path, size, mtime_ns) -> (sha256, mode) in SQLite: safe for two runs at once, and
    kept after every chunk so an interrupted run resumes where it stopped."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                        "sha256 TEXT, mode TEXT)")

    def get(self, keys: List[Tuple[str, int, int]]) -> Dict[str, Tuple[str, str]]:
        found = {}
        for path, size, mtime in keys:
            row = self.db.execute("SELECT sha256, mode FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
                                  (path, size, mtime)).fetchone()
            if row:
                found[path] = row
        return found

    def put(self, rows: List[Tuple[str, int, int, str, str]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self.db.close()


def hash_image(path: str) -> Tuple[str, str]:
    """(sha256 of the file, image mode); raises ValueError naming what is wrong with the image."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("the file is empty")
    return hashlib.sha256(data).hexdigest(), check_image(data)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_or_error(path: str):
    try:
        return hash_image(path)
    except (OSError, ValueError) as e:
        return str(e)


def carve(path: str, seed: int, val: bool, test: bool, val_fraction: float, test_fraction: float) -> Optional[str]:
    """The split a training image is carved into by the hash of its path (None: it stays in train)."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "big") / 2**64
    if test and u < test_fraction:
        return "test"
    if val and (test_fraction if test else 0.0) <= u < (test_fraction if test else 0.0) + val_fraction:
        return "val"
    return None


def split_rule(given: Tuple[Optional[str], ...], seed: int, val_fraction: float, test_fraction: float):
    """item -> split: the given splits, ImageNet's val as test, and carving of the missing ones."""
    named = {s for s in given if s}
    val_is_test = "val" in named and "test" not in named
    carve_test = "test" not in named and not val_is_test
    carve_val = "val" not in named or val_is_test

    def split_of(item: Item) -> str:
        if item.origin == "val" and val_is_test:
            return "test"
        if item.origin in (None, "train"):
            return carve(item.path, seed, carve_val, carve_test, val_fraction, test_fraction) or "train"
        return item.origin

    return split_of


@dataclass
class ManifestStats:
    data_version: str
    classes: List[str]
    counts: Dict[str, int]
    modes: Dict[str, int]
    bytes: int
    hashed: int     # files read (new or changed)
    cached: int     # files whose hash came from the cache


def _batches(items: Iterator[Item], n: int) -> Iterator[List[Item]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _named(problems: List[Tuple[str, str]], total: int) -> str:
    shown = "; ".join(f"{p} ({why})" for p, why in problems[:SHOWN])
    return shown + (f"; and {total - SHOWN} more" if total > SHOWN else "")


@dataclass
class _Tally:
    """What writing a manifest counts: rows per split, training images per class, image modes, bytes,
    and the files it could not use (the first SHOWN of them named)."""
    counts: Dict[str, int]
    train_per_class: Dict[str, int]
    modes: Dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    hashed: int = 0
    cached: int = 0
    missing: List[Tuple[str, str]] = field(default_factory=list)
    bad: List[Tuple[str, str]] = field(default_factory=list)
    n_missing: int = 0
    n_bad: int = 0

    def add(self, split: str, cls: str, mode: str, size: int) -> None:
        self.counts[split] += 1
        self.train_per_class[cls] += split == "train"
        self.modes[mode] = self.modes.get(mode, 0) + 1
        self.bytes += size

    def problem(self, kind: str, path: str, why: str) -> None:
        setattr(self, f"n_{kind}", getattr(self, f"n_{kind}") + 1)
        if len(getattr(self, kind)) < SHOWN:
            getattr(self, kind).append((path, why))


def build_manifest(source: Source, out: Path, cache_path: Path, seed: int = 0, val_fraction: float = 0.15,
                   test_fraction: float = 0.15, workers: int = 0, progress: bool = True) -> ManifestStats:
    """Write `source`'s manifest to `out` (CSV, streamed: memory does not grow with the images)."""
    split_of = split_rule(source.given_splits, seed, val_fraction, test_fraction)
    label = {c: i for i, c in enumerate(source.classes)}
    tally = _Tally({s: 0 for s in SPLITS}, {c: 0 for c in source.classes})
    cache = HashCache(cache_path)
    with contextlib.ExitStack() as stack:
        writer = csv.writer(stack.enter_context(open(out, "w", newline="")), lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        pool = None
        bar = stack.enter_context(tqdm(desc="hashing images", unit="img", disable=not progress, mininterval=1))
        for batch in _batches(source.items(), CHUNK):
            found = _stat_files(source, batch, tally)
            known = cache.get([(full, size, mtime) for _, full, size, mtime in found])
            todo = [full for _, full, _, _ in found if full not in known]
            if len(todo) > 64 and workers > 1 and pool is None:  # worth the processes' start
                pool = stack.enter_context(ProcessPoolExecutor(workers))
            results = {**known, **dict(zip(todo, pool.map(_hash_or_error, todo, chunksize=16) if pool
                                          else map(_hash_or_error, todo)))}
            new = []
            for item, full, size, mtime in found:
                if isinstance(results[full], str):  # an error message
                    tally.problem("bad", full, results[full])
                    continue
                digest, mode = results[full]
                if full not in known:
                    new.append((full, size, mtime, digest, mode))
                split = split_of(item)
                writer.writerow((item.path, label[item.cls], item.cls, split, size, digest))
                tally.add(split, item.cls, mode, size)
            cache.put(new)
            tally.hashed, tally.cached = tally.hashed + len(todo), tally.cached + len(known)
            bar.update(len(batch))
    cache.close()
    _check_tally(tally, source, val_fraction, test_fraction)
    return ManifestStats(file_sha256(out), source.classes, tally.counts, dict(sorted(tally.modes.items())),
                         tally.bytes, tally.hashed, tally.cached)


def _stat_files(source: Source, batch: List[Item], tally: _Tally) -> List[Tuple[Item, str, int, int]]:
    """(item, absolute path, size, mtime) of the batch's files that exist; the others tallied as missing."""
    found = []
    for item in batch:
        full = os.path.abspath(source.root / item.path)
        try:
            st = os.stat(full)
            found.append((item, full, st.st_size, st.st_mtime_ns))
        except OSError:
            tally.problem("missing", str(source.root / item.path), "missing")
    return found


def _check_tally(tally: _Tally, source: Source, val_fraction: float, test_fraction: float) -> None:
    """Raise, naming the files or splits, if the manifest cannot be used."""
    if tally.n_missing:
        raise ConvHeadsError(f"{tally.n_missing} listed image file(s) not found: "
                             f"{_named(tally.missing, tally.n_missing)}; fix the paths (relative to {source.root}) or "
                             f"remove the rows")
    if tally.n_bad:
        raise ConvHeadsError(f"{tally.n_bad} file(s) are not readable images: {_named(tally.bad, tally.n_bad)}; remove "
                             f"or replace them, then rerun (images already checked are not read again)")
    for split, n in tally.counts.items():
        if n == 0:
            raise ConvHeadsError(f"the {split} split has no images ({sum(tally.counts.values())} images in all, "
                                 f"val_fraction {val_fraction}, test_fraction {test_fraction}); add images to it"
                                 + (f" ({source.root}/{split}/<class>/)" if source.layout == "split folders" else
                                    " or raise the fraction"))
    empty = [c for c, n in tally.train_per_class.items() if n == 0]
    if empty:
        raise ConvHeadsError(f"class(es) with no training images: {', '.join(empty[:SHOWN])}; add images or drop "
                             f"them from data.classes")


def listing_digest(source: Source) -> str:
    """A hash of the names, sizes and modification times of the source's images (and files such
    as the CSV): cheap (no file is read), and it changes when the dataset does."""
    h = hashlib.sha256()
    for path in source.extra_files:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for item in source.items():
        try:
            st = os.stat(source.root / item.path)
            h.update(f"{item.path}\0{item.cls}\0{item.origin}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{item.path}\0missing\n".encode())
    return h.hexdigest()
