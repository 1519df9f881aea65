"""Images in: decoding any image file as RGB, checking files without decoding them fully, the
bundled digits, splits, and timm's transforms at a model's resolution.

Image modes are converted to RGB as timm's and torchvision's loaders do (`Image.convert("RGB")`):
grayscale is repeated over the three channels, palette images are expanded, an alpha channel is
dropped (the colour values are kept as they are), CMYK is converted; 16-bit grayscale (PNG mode
I;16, or I) is scaled to 8 bits (value / 256) first, where PIL's own conversion would clip it.
"""
import io
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image
from timm.data import create_transform
from torchvision import transforms

from ..errors import ConvHeadsError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
AUGMENTATIONS = ("auto", "timm", "light", "none")
# Modes open_image converts to RGB (anything else, e.g. float images, is refused with the file named).
MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "I;16", "I;16L", "I;16B", "I;16N")


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
                        splits: Dict[str, np.ndarray]) -> None:
    """Write images (PIL images or uint8 arrays) as root/<split>/<class>/<index>.png: generated
    data (the digits, a torchvision dataset) becomes an image folder like any other."""
    for split, indices in splits.items():
        for i in indices:
            path = root / split / classes[labels[i]] / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = images[i] if isinstance(images[i], Image.Image) else Image.fromarray(images[i])
            img.save(path)


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB (see the module docstring for each mode)."""
    if img.mode not in MODES:
        raise ConvHeadsError(f"image mode {img.mode} is not supported")
    if img.mode.startswith("I"):  # 16-bit grayscale: scale, do not clip
        img = Image.fromarray((np.asarray(img, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8), "L")
    elif img.mode in ("P", "PA"):  # a palette with transparency expands to RGBA first
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(path: Path) -> Image.Image:
    """Decode an image file as RGB, with an error naming the file if it is empty or corrupt."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (ConvHeadsError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ConvHeadsError(f"cannot read image {path} ({e}); remove or replace the file, then rerun the data "
                             f"stage") from None


def check_image(data: bytes) -> str:
    """The mode of the image in `data`, checked to the end of its pixel data; raises ValueError.

    JPEGs are decoded at 1/8 scale (the whole entropy-coded stream is still read, so a truncated
    or damaged file fails) and PNGs checked chunk by chunk (CRCs), both far faster than decoding."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            mode = img.mode
            if mode not in MODES:
                raise ValueError(f"image mode {mode} is not supported; convert the image to 8-bit RGB or grayscale")
            if img.format == "PNG":
                img.verify()
            else:
                if img.format == "JPEG":
                    img.draft(img.mode, (1, 1))
                img.load()
            return mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(str(e) or type(e).__name__) from None


def image_transform(data_config: Dict, augment: str = "none"):
    """timm's transforms for one model input (`data_config`: timm.data.resolve_data_config's keys).

    none: resize and centre crop to the input size (crop_pct) and normalise, timm's eval transform.
    timm: timm's train transform (random resized crop, horizontal flip, colour jitter).
    light: the eval transform with small random shifts (1/16 of the side) and rotations (5 degrees):
    no flips and no crops, for images whose orientation or extent carries the label (a flipped
    digit is another digit, a cropped one may be too).
    """
    if augment == "timm":
        return create_transform(**data_config, is_training=True)
    if augment not in ("none", "light"):
        raise ConvHeadsError(f"augment must be one of {AUGMENTATIONS[1:]}; got {augment!r}")
    steps = list(create_transform(**data_config, is_training=False).transforms)
    if augment == "light":  # on the resized image, before it becomes a tensor
        steps.insert(len(steps) - 2, transforms.RandomAffine(degrees=5, translate=(0.0625, 0.0625)))
    return transforms.Compose(steps)
