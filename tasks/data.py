"""Stage 1, data versioning: materialise the dataset as an image folder per split with a manifest.

Sources: the embedded digits (default, no download), a class-per-subfolder image folder, or a
torchvision dataset (downloaded when online). The content hash of what is written is the data
version recorded with every run.
"""
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd

from convheads import ConvHeadsError
from convheads.data import (IMAGE_SUFFIXES, MANIFEST, SPLITS, digits_images, folder_hash, open_image,
                            split_indices, write_split_folders)

from .config import DataConfig, PipelineConfig

META = "meta.json"


def _digits(cfg: DataConfig):
    images, labels = digits_images(cfg.image_size)
    return list(images), labels, [str(i) for i in range(10)], split_indices(labels, cfg.val_fraction,
                                                                             cfg.test_fraction, cfg.seed)


def _folder(cfg: DataConfig):
    """<path>/<class>/<image> (split here, seeded) or <path>/{train,val,test}/<class>/<image>."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise ConvHeadsError(f"data.path {root} is not a folder; point it at a class-per-subfolder image folder")
    presplit = (root / "train").is_dir()
    parts = {s: root / s for s in SPLITS if (root / s).is_dir()} if presplit else {None: root}
    classes = sorted({c.name for base in parts.values() for c in base.iterdir() if c.is_dir()})
    if not classes:
        raise ConvHeadsError(f"data.path {root} has no class subfolders (expected {root}/<class>/<image>)")
    images: List = []
    labels: List[int] = []
    origin: List = []
    for split, base in parts.items():
        for c, name in enumerate(classes):
            for file in sorted((base / name).glob("*")) if (base / name).is_dir() else []:
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(open_image(file).resize((cfg.image_size, cfg.image_size)))
                    labels.append(c)
                    origin.append(split)
    if len(images) < 2 * len(classes):
        raise ConvHeadsError(f"data.path {root} holds {len(images)} images for {len(classes)} classes; too few to split")
    labels_arr, origin_arr = np.array(labels), np.array(origin, dtype=object)
    if not presplit:
        return images, labels_arr, classes, split_indices(labels_arr, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    splits = {s: np.flatnonzero(origin_arr == s) for s in SPLITS}
    if len(splits["val"]) == 0:  # carve a validation split out of train
        train = splits["train"]
        sub = split_indices(labels_arr[train], cfg.val_fraction, cfg.test_fraction, cfg.seed)
        splits["val"] = train[sub["val"]]
        splits["train"] = np.setdiff1d(train, splits["val"])
    if len(splits["test"]) == 0:
        raise ConvHeadsError(f"data.path {root} has train/ but no test/ split; add one or use a flat class folder")
    return images, labels_arr, classes, splits


def _torchvision(cfg: DataConfig):
    """A torchvision dataset with a train/test split (MNIST, CIFAR10, ...); val is carved from train."""
    import torchvision

    cls = getattr(torchvision.datasets, cfg.torchvision_name, None)
    if cls is None:
        raise ConvHeadsError(f"data.torchvision_name {cfg.torchvision_name!r} is not a torchvision.datasets class")
    parts = []
    for train in (True, False):
        try:
            parts.append(cls(root=cfg.download_dir, train=train, download=True))
        except TypeError:
            raise ConvHeadsError(f"torchvision dataset {cfg.torchvision_name} has no train/test split argument; "
                                 f"export it to an image folder and use data.source=folder") from None
        except Exception as e:  # noqa: BLE001 -- download failures come as URLError, RuntimeError, OSError...
            raise ConvHeadsError(
                f"could not get torchvision dataset {cfg.torchvision_name} ({type(e).__name__}: {e}). Without "
                f"network access, download it elsewhere into {cfg.download_dir} or use data.source=folder") from None
    images = [img.resize((cfg.image_size, cfg.image_size)) for p in parts for img, _ in p]
    labels = np.array([int(y) for p in parts for _, y in p])
    n_train = len(parts[0])
    classes = [str(c) for c in getattr(parts[0], "classes", sorted(set(labels.tolist())))]
    train = np.arange(n_train)
    sub = split_indices(labels[train], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    splits = {"train": np.setdiff1d(train, sub["val"]), "val": np.sort(sub["val"]),
              "test": np.arange(n_train, len(labels))}
    return images, labels, classes, splits


SOURCES = {"digits": _digits, "folder": _folder, "torchvision": _torchvision}


def run(cfg: PipelineConfig, out: Path) -> Dict:
    images, labels, classes, splits = SOURCES[cfg.data.source](cfg.data)
    rows = write_split_folders(out, images, labels, classes, splits)
    pd.DataFrame(rows).to_csv(out / MANIFEST, index=False)
    counts = {s: int(len(i)) for s, i in splits.items()}
    meta = {"source": cfg.data.source, "classes": classes, "counts": counts, "image_size": cfg.data.image_size}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "data_version": folder_hash(out)}


def source_listing(cfg: PipelineConfig):
    """What the data stage's fingerprint watches besides the configuration: a source folder's files."""
    if cfg.data.source != "folder" or not Path(cfg.data.path).is_dir():
        return None
    return [(p.relative_to(cfg.data.path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(cfg.data.path).rglob("*")) if p.is_file()]


def read_meta(cfg: PipelineConfig) -> dict:
    path = Path(cfg.paths.data) / META
    if not path.is_file():
        raise ConvHeadsError(f"no dataset at {cfg.paths.data} (missing {META}); run the data stage first")
    return json.loads(path.read_text())
