"""Segmentation data: image/mask pairs in ADE20K's layout, their manifest, dataset and transforms.

Layout (ADE20K's; `test/` optional)::

    <root>/images/{training,validation[,test]}/<name>.jpg|png   RGB images
    <root>/annotations/{training,validation[,test]}/<name>.png  single-channel labels (mode L or P)
    <root>/classes.txt                                          optional: one class name per line

training is the train split (val carved out of it by a hash of each path, as for classification
folders); validation is the val split if test/ exists, else the test split (as ADE20K reports on
it). Label 255 is "not labelled" (ignore_index) and counts nowhere; with reduce_zero_label (as
ADE20K uses) label 0 becomes 255 and every other label moves down by one. The class count is
the configured one, else classes.txt's, else the largest label found + 1.

The manifest (CSV: path, mask, split, size, sha256, mask_sha256) holds every pair checked: both
files readable, the mask single-channel, of the image's size, and with labels in range; the
data version is its hash, as for classification.
"""
import csv
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import ConvHeadsError
from ..segmentation import IGNORE_INDEX
from .images import IMAGE_SUFFIXES, SPLITS, check_image, open_image
from .loaders import seeded
from .manifest import SHOWN, Item, file_sha256, split_rule

FOLDERS = {"training": "train", "validation": "val", "test": "test"}
CLASSES_FILE = "classes.txt"
MASK_MODES = ("L", "P")
MANIFEST_COLUMNS = ("path", "mask", "split", "size", "sha256", "mask_sha256")


@dataclass
class Pairs:
    """An ADE20K-style folder as found: its root, the (image, mask) paths per given split, class names."""
    root: Path
    pairs: Dict[str, List[Tuple[str, str]]]   # folder name (training, ...) -> [(image, mask)], relative to root
    class_names: Optional[List[str]]           # from classes.txt, if there is one


def scan_pairs(root: Path) -> Pairs:
    """List an ADE20K-style folder (no image is read); every image needs its mask and vice versa."""
    root = Path(root)
    images, annotations = root / "images", root / "annotations"
    for folder in (images, annotations):
        if not folder.is_dir():
            raise ConvHeadsError(f"{root} has no {folder.name}/ folder; a segmentation dataset needs "
                                 f"images/{{training,validation}}/<name>.jpg and "
                                 f"annotations/{{training,validation}}/<name>.png")
    if not (images / "training").is_dir():
        raise ConvHeadsError(f"{images} has no training/ folder; put the training images in {images}/training/")
    pairs = {}
    for folder in FOLDERS:
        if not (images / folder).is_dir() and not (annotations / folder).is_dir():
            continue
        found_images = _stems(images / folder, IMAGE_SUFFIXES)
        found_masks = _stems(annotations / folder, (".png",))
        lonely = [f"images/{folder}/{found_images[s]}" for s in sorted(set(found_images) - set(found_masks))]
        orphans = [f"annotations/{folder}/{found_masks[s]}" for s in sorted(set(found_masks) - set(found_images))]
        if lonely:
            raise ConvHeadsError(f"{len(lonely)} image(s) in {root} have no mask (expected annotations/{folder}/<name>"
                                 f".png): {', '.join(lonely[:SHOWN])}; add their masks or remove the images")
        if orphans:
            raise ConvHeadsError(f"{len(orphans)} mask(s) in {root} have no image (expected images/{folder}/<name>"
                                 f".jpg or .png): {', '.join(orphans[:SHOWN])}; add their images or remove the masks")
        if not found_images:
            raise ConvHeadsError(f"{images / folder} holds no images; add images or remove the folder")
        pairs[folder] = [(f"images/{folder}/{found_images[s]}", f"annotations/{folder}/{found_masks[s]}")
                         for s in sorted(found_images)]
    names_file = root / CLASSES_FILE
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()] \
        if names_file.is_file() else None
    return Pairs(root, pairs, names)


def _stems(folder: Path, suffixes) -> Dict[str, str]:
    """{stem: file name} of the files with these suffixes in `folder` (none if it does not exist)."""
    if not folder.is_dir():
        return {}
    found = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(suffixes):
            stem = Path(entry.name).stem
            if stem in found:
                raise ConvHeadsError(f"{folder} has two files named {stem}: {found[stem]} and {entry.name}; keep one")
            found[stem] = entry.name
    return found


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """ADE20K's convention: 0 (other) becomes ignore (255), every other label moves down by one."""
    mask = mask.astype(np.int64) - 1
    mask[mask < 0] = IGNORE_INDEX
    mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX  # 255 stays 255
    return mask


def read_mask(path: Path, reduce_zero: bool = False) -> np.ndarray:
    """A label mask as int64 [H, W], with an error naming the file if it is not single-channel."""
    with Image.open(path) as img:
        if img.mode not in MASK_MODES:
            raise ConvHeadsError(f"mask {path} has mode {img.mode} ({len(img.getbands())} channels); masks must be "
                                 f"single-channel label images (mode L or P, one class index per pixel)")
        mask = np.asarray(img, dtype=np.int64)
    return reduce_zero_label(mask) if reduce_zero else mask


def check_pair(root: str, image: str, mask: str, reduce_zero: bool) -> Tuple:
    """(size, sha256, mask_sha256, labels found) of a pair, or an error message naming the file."""
    try:
        with open(Path(root) / image, "rb") as f:
            data = f.read()
        check_image(data)
        with Image.open(Path(root) / image) as img:
            image_size = img.size
    except (OSError, ValueError) as e:
        return f"{Path(root) / image}: {e or 'the file is empty'}"
    try:
        labels = read_mask(Path(root) / mask, reduce_zero)
    except ConvHeadsError as e:
        return str(e)
    except (OSError, ValueError) as e:
        return f"{Path(root) / mask}: {e}"
    if labels.shape[::-1] != image_size:
        return (f"{Path(root) / mask}: mask is {labels.shape[1]} x {labels.shape[0]} but its image {image} is "
                f"{image_size[0]} x {image_size[1]} (width x height); a mask must have its image's size")
    return (len(data), hashlib.sha256(data).hexdigest(), file_sha256(Path(root) / mask),
            np.unique(labels).tolist())


@dataclass
class PairStats:
    data_version: str
    num_classes: int
    class_names: List[str]
    counts: Dict[str, int]
    bytes: int


def build_pair_manifest(found: Pairs, out: Path, num_classes: Optional[int] = None, reduce_zero: bool = False,
                        seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                        workers: int = 0) -> PairStats:
    """Check every pair and write the manifest to `out`; the class count is `num_classes`, else the
    class-names file's, else the largest label found + 1 (see the module docstring)."""
    split_of = split_rule(tuple(FOLDERS[f] for f in found.pairs), seed, val_fraction, test_fraction)
    todo = [(folder, image, mask) for folder, pairs in found.pairs.items() for image, mask in pairs]
    args = [(str(found.root), image, mask, reduce_zero) for _, image, mask in todo]
    if workers > 1 and len(todo) > 64:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(check_pair, *zip(*args), chunksize=16))
    else:
        results = [check_pair(*a) for a in args]
    bad = [r for r in results if isinstance(r, str)]
    if bad:
        raise ConvHeadsError(f"{len(bad)} image/mask pair(s) are not usable: {'; '.join(bad[:SHOWN])}")
    expected = num_classes or (len(found.class_names) if found.class_names else None)
    labels = sorted({v for r in results for v in r[3]} - {IGNORE_INDEX})
    if expected is None:
        expected = labels[-1] + 1 if labels else 1
    outside = [(image, mask, [v for v in r[3] if v != IGNORE_INDEX and not 0 <= v < expected])
               for (_, image, mask), r in zip(todo, results)]
    outside = [o for o in outside if o[2]]
    if outside:
        shown = "; ".join(f"{found.root / m} has {', '.join(map(str, v))}" for _, m, v in outside[:SHOWN])
        raise ConvHeadsError(
            f"{len(outside)} mask(s) have labels outside 0..{expected - 1} that are not the ignore index "
            f"{IGNORE_INDEX}: {shown}; fix the masks, or set segmentation.num_classes"
            + (" (or segmentation.reduce_zero_label if 0 means 'not labelled')" if not reduce_zero else ""))
    names = found.class_names if found.class_names and len(found.class_names) == expected else \
        [str(i) for i in range(expected)]
    counts = {s: 0 for s in SPLITS}
    with open(out, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for (folder, image, mask), (size, digest, mask_digest, _) in zip(todo, results):
            split = split_of(Item(image, "", FOLDERS[folder]))
            writer.writerow((image, mask, split, size, digest, mask_digest))
            counts[split] += 1
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        raise ConvHeadsError(f"the {', '.join(empty)} split(s) of {found.root} have no images ({len(todo)} pairs in "
                             f"all); add images (images/validation/ is the test split) or raise the fractions")
    return PairStats(file_sha256(out), expected, names, counts, sum(r[0] for r in results))


def mask_transform(size: Tuple[int, int], mean, std, augment: str = "none") -> v2.Compose:
    """Joint image + mask transforms (torchvision transforms.v2): masks are resampled nearest-neighbour.

    none: resize to `size`. light: small shifts and rotations (digits scenes: a flipped digit is
    another digit). timm: random resized crop (scale 0.5-1) and horizontal flip, as for ADE20K."""
    if augment == "timm":
        steps = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(size, antialias=True)]
        if augment == "light":
            steps.append(v2.RandomAffine(degrees=5, translate=(0.0625, 0.0625), fill={tv_tensors.Image: 0,
                                                                                      tv_tensors.Mask: IGNORE_INDEX}))
    return v2.Compose([*steps, v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                       v2.Normalize(mean, std)])


class PairDataset(Dataset):
    """One split of a pair manifest: (image [3, H, W], mask [H, W] int64) decoded on access."""

    def __init__(self, manifest: Path, root: Path, split: str, transform, reduce_zero: bool = False):
        try:
            table = pd.read_csv(manifest, usecols=["path", "mask", "split"], dtype=str, keep_default_na=False)
        except (OSError, ValueError) as e:
            raise ConvHeadsError(f"cannot read the dataset manifest {manifest} ({e}); rerun the data stage") from None
        table = table[table.split == split]
        if table.empty:
            raise ConvHeadsError(f"the {split} split of {manifest} has no images; rerun the data stage")
        self.root, self.transform, self.reduce_zero = Path(root), transform, reduce_zero
        self.paths = table.path.to_numpy(dtype=bytes)   # numpy, not lists: workers share them
        self.masks = table["mask"].to_numpy(dtype=bytes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        image = tv_tensors.Image(v2.functional.pil_to_tensor(open_image(self.root / self.paths[i].decode())))
        mask = tv_tensors.Mask(torch.from_numpy(read_mask(self.root / self.masks[i].decode(), self.reduce_zero)))
        with seeded(seed):
            image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()
