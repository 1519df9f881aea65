"""Datasets: the embedded digits default, class-per-subfolder image folders, torchvision datasets.

Every source is materialised the same way: an image folder per split (root/train/<class>/*.png,
root/val/..., root/test/...) plus a manifest table, so one loader serves them all and the folder
is what DVC versions.
"""
import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .errors import ConvHeadsError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MANIFEST = "manifest.csv"


def digits_images(image_size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8 x 8 handwritten digits (1,797 images, no download) as
    uint8 RGB images [N, image_size, image_size, 3] (white digit on black) and labels [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.stack([
        np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BICUBIC).convert("RGB"))
        for g in gray])
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> Dict[str, np.ndarray]:
    """A seeded, stratified train/val/test split of sample indices."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConvHeadsError(f"val_fraction and test_fraction must be in (0, 1) and sum below 1; "
                             f"got {val_fraction} and {test_fraction}")
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest],
                                  random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def write_split_folders(root: Path, images: Sequence, labels: np.ndarray, classes: List[str],
                        splits: Dict[str, np.ndarray]) -> List[dict]:
    """Write images (PIL images or uint8 arrays) as root/<split>/<class>/<index>.png; return manifest rows."""
    rows = []
    for split, indices in splits.items():
        for i in indices:
            rel = Path(split) / classes[labels[i]] / f"{i:06d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img = images[i] if isinstance(images[i], Image.Image) else Image.fromarray(images[i])
            img.convert("RGB").save(root / rel)
            rows.append({"path": rel.as_posix(), "label": int(labels[i]), "class": classes[labels[i]], "split": split})
    return rows


def folder_hash(root: Path) -> str:
    """A content hash of every file under root (paths and bytes): the data version."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


class ImageFolderSplit(Dataset):
    """One split of a class-per-subfolder image folder; classes are sorted folder names."""

    def __init__(self, root: Path, split: str, transform=None, classes: Optional[List[str]] = None):
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise ConvHeadsError(f"dataset split folder not found: {self.root} (expected <root>/{split}/<class>/<image>)")
        self.classes = classes or sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ConvHeadsError(f"{self.root} has no class subfolders (expected {self.root}/<class>/<image>)")
        self.samples = [(p, c) for c, name in enumerate(self.classes) if (self.root / name).is_dir()
                        for p in sorted((self.root / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise ConvHeadsError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}")
        self.transform = transform or transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(open_image(path)), label


def open_image(path: Path) -> Image.Image:
    """Open an image as RGB, with an error naming the file if it is empty or corrupt."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ConvHeadsError(f"cannot read image {path} ({e}); remove or replace the file") from None


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool = False):
    """Resize to the model's input size and normalise; light augmentation for training."""
    steps = [transforms.Resize((image_size, image_size))]
    if train:
        steps.append(transforms.RandomAffine(degrees=5, translate=(0.0625, 0.0625)))
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def make_loader(root: Path, split: str, image_size: int, batch_size: int, mean: Sequence[float],
                std: Sequence[float], train: bool = False, augment: bool = True, num_workers: int = 0,
                classes: Optional[List[str]] = None) -> DataLoader:
    """A DataLoader over one split; when `train`, shuffled (from the global torch RNG, which
    convheads.training.train reseeds every epoch) and augmented if `augment`."""
    dataset = ImageFolderSplit(root, split, image_transform(image_size, mean, std, train and augment), classes)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=num_workers)
