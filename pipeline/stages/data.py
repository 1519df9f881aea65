"""Stage data, data versioning: a manifest of the dataset's images, which stay where they are.

Sources: the embedded digits (default, no download) and a torchvision dataset (downloaded when
online) are generated into the stage's folder as images; a user's image folder or CSV is read in
place (convheads.data.manifest: layouts, splits, hashing). The stage writes manifest.csv (path, label,
class, split, size, sha256 per image) and meta.json (where the images are, classes, counts, image
modes, and the DVC hash if the folder is tracked by DVC); the manifest's hash is the data version.
"""
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import yaml
from PIL import Image

from convheads import ConvHeadsError
from convheads.data.images import digits_images, split_indices, write_split_folders
from convheads.data.loaders import cpu_cores
from convheads.data.manifest import build_manifest
from convheads.data.photos import PhotoCrops, load_photos
from convheads.data.scenes import CLASSES, digit_scenes
from convheads.data.segmentation import CLASSES_FILE, FOLDERS, build_pair_manifest, scan_pairs

from ..artifacts import MANIFEST, META
from ..config import EMBEDDED, DataConfig, PipelineConfig, photo_settings
from ..runner import Stage
from ..sources import source, source_listing

HASH_CACHE = ".cache/hashes.sqlite"  # beside the dataset folder: it outlives reruns (DVC deletes outputs)


def _digits(cfg: DataConfig, out: Path) -> None:
    images, labels = digits_images(cfg.image_size)
    write_split_folders(out, images, labels, [str(i) for i in range(10)],
                        split_indices(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed))


def _photos(cfg: DataConfig, out: Path) -> None:
    """Crops of the bundled photographs, each split cut from its own tiles (convheads.data.photos)."""
    photos = load_photos()
    for split, per_class in cfg.photos.model_dump().items():
        if split not in ("train", "val", "test"):
            continue
        crops = PhotoCrops(photos, photo_settings(cfg), split)
        for i in range(per_class * len(crops.classes)):
            image, label = crops.sample(i)
            path = out / split / crops.classes[label] / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)


def _torchvision(cfg: DataConfig, out: Path) -> None:
    """A torchvision dataset with a train/test split (MNIST, CIFAR10, ...), written as images at
    their own size; val is carved from train."""
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
    images = [img for p in parts for img, _ in p]
    labels = np.array([int(y) for p in parts for _, y in p])
    n_train = len(parts[0])
    classes = [str(c) for c in getattr(parts[0], "classes", sorted(set(labels.tolist())))]
    train = np.arange(n_train)
    sub = split_indices(labels[train], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    splits = {"train": np.setdiff1d(train, sub["val"]), "val": np.sort(sub["val"]),
              "test": np.arange(n_train, len(labels))}
    write_split_folders(out, images, labels, classes, splits)


GENERATORS = {"digits": _digits, "photos": _photos, "torchvision": _torchvision}  # sources.GENERATED


def dvc_record(path: Path) -> Optional[dict]:
    """What DVC records for a folder tracked by `dvc add` / `dvc import` (the .dvc file beside it)."""
    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    try:
        spec = yaml.safe_load(dvc_file.read_text())
        out = spec["outs"][0]
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise ConvHeadsError(f"{dvc_file} is not a DVC file (no outs); remove it or rerun dvc add") from None
    record = {"file": str(dvc_file), "md5": out.get("md5"), "size": out.get("size"), "nfiles": out.get("nfiles")}
    dep = (spec.get("deps") or [{}])[0].get("repo")
    if dep:  # dvc import: where the data came from
        record["import"] = {"url": dep.get("url"), "rev_lock": dep.get("rev_lock")}
    return record


def hash_cache(cfg: PipelineConfig) -> Path:
    return Path(cfg.paths.data).parent / HASH_CACHE


def _hashing_workers(cfg: PipelineConfig) -> int:
    return min(8, cpu_cores()) if cfg.loader.num_workers is None else cfg.loader.num_workers


def _scenes(cfg: PipelineConfig, out: Path) -> None:
    """The digits scenes (convheads.scenes) written in ADE20K's layout, with their class names."""
    s = cfg.segmentation
    folder = {split: name for name, split in FOLDERS.items()}
    for split, (images, masks) in digit_scenes(s.image_size, cfg.data.seed, s.scenes.model_dump()).items():
        for kind, arrays in (("images", images), ("annotations", masks)):
            (out / kind / folder[split]).mkdir(parents=True, exist_ok=True)
            for i, array in enumerate(arrays):
                Image.fromarray(array).save(out / kind / folder[split] / f"{i:05d}.png")
    (out / CLASSES_FILE).write_text("\n".join(CLASSES) + "\n")


def _segmentation(cfg: PipelineConfig, out: Path) -> Tuple[Dict, str, str]:
    """The data stage for task=segmentation: image/mask pairs checked and listed in a manifest."""
    d, s = cfg.data, cfg.segmentation
    generated = d.source == "digits"
    if generated:
        _scenes(cfg, out)
    found = scan_pairs(out if generated else Path(d.path))
    stats = build_pair_manifest(found, out / MANIFEST, s.num_classes, s.reduce_zero_label, seed=d.seed,
                                val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                                workers=_hashing_workers(cfg))
    meta = {"source": d.source, "task": "segmentation", "root": None if generated else str(found.root),
            "layout": "images/ + annotations/ (ADE20K)", "classes": stats.class_names, "counts": stats.counts,
            "bytes": stats.bytes}
    return meta, stats.data_version, f"{sum(stats.counts.values())} image/mask pairs, {stats.num_classes} classes"


def run(cfg: PipelineConfig, out: Path) -> Dict:
    meta, data_version, found = (_segmentation if cfg.task == "segmentation" else _classification)(cfg, out)
    dvc = None if meta["root"] is None else dvc_record(Path(cfg.data.path))
    if dvc:
        meta["dvc"] = dvc
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"data: {found}, data version {data_version[:16]}")
    return {**meta, "data_version": data_version}


def _classification(cfg: PipelineConfig, out: Path) -> Tuple[Dict, str, str]:
    """The data stage for task=classification: the images listed (and checked) in a manifest."""
    d = cfg.data
    generated = d.source in GENERATORS
    if generated:
        GENERATORS[d.source](d, out)
    found = source(d, out)
    stats = build_manifest(found, out / MANIFEST, hash_cache(cfg), seed=d.seed, val_fraction=d.val_fraction,
                           test_fraction=d.test_fraction, workers=_hashing_workers(cfg))
    meta = {"source": d.source, "root": None if generated else str(found.root), "layout": found.layout,
            "classes": stats.classes, "counts": stats.counts, "modes": stats.modes, "bytes": stats.bytes}
    if d.source in EMBEDDED:
        meta["image_size"] = d.image_size
    return meta, stats.data_version, (f"{sum(stats.counts.values())} images ({stats.hashed} read, {stats.cached} "
                                      f"unchanged since hashed)")


STAGE = Stage("data", run, ("task", "data", "segmentation"), watch=source_listing)
