"""The embedded segmentation data: scenes composed of scikit-learn's bundled digits (no download).

A scene is a size x size canvas with a random dark background (a colour plus noise) and 2 to 4
digits scaled to 1/4 to 3/8 of the side, each in a random bright colour, placed at random (later
digits cover earlier ones). Its mask labels a pixel with the digit's class + 1 where the digit's
stroke is (its scaled intensity above half its maximum) and 0 elsewhere: 11 classes, background
included. Everything is drawn from one seeded generator, so a seed gives the same scenes anywhere.
The training, validation and test scenes are composed of disjoint sets of digit images.
"""
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from .images import split_indices

CLASSES = ["background"] + [f"digit {d}" for d in range(10)]
SCENE_SPLITS = {"train": 300, "val": 60, "test": 200}   # scenes per split in the default dataset
STROKE = 0.5  # a pixel belongs to a digit where its scaled intensity is above this fraction of the maximum


def _digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def compose(digits: np.ndarray, labels: np.ndarray, count: int, size: int, rng: np.random.Generator,
            per_scene: Tuple[int, int] = (2, 4)) -> Tuple[np.ndarray, np.ndarray]:
    """`count` scenes from the [N, 8, 8] digit images in [0, 1]: uint8 images [count, size, size, 3]
    and uint8 masks [count, size, size]."""
    images = np.empty((count, size, size, 3), np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    for i in range(count):
        canvas = rng.uniform(0, 0.25, 3)[None, None, :] + rng.normal(0, 0.03, (size, size, 3))
        for _ in range(rng.integers(per_scene[0], per_scene[1] + 1)):
            k = rng.integers(len(digits))
            side = int(rng.integers(size // 4, 3 * size // 8 + 1))
            glyph = np.asarray(Image.fromarray(digits[k]).resize((side, side), Image.BILINEAR))
            glyph = glyph / max(glyph.max(), 1e-6)
            y, x = rng.integers(0, size - side + 1, 2)
            colour = rng.uniform(0.5, 1.0, 3)
            window = canvas[y:y + side, x:x + side]
            window[:] = window * (1 - glyph[..., None]) + colour * glyph[..., None]
            masks[i, y:y + side, x:x + side][glyph > STROKE] = labels[k] + 1
        images[i] = (canvas.clip(0, 1) * 255).round().astype(np.uint8)
    return images, masks


def digit_scenes(size: int = 64, seed: int = 0, counts: Dict[str, int] = SCENE_SPLITS
                 ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{split: (images, masks)} for the splits in `counts`, each composed of its own digit images."""
    digits, labels = _digits()
    pools = split_indices(labels, 0.15, 0.2, seed)  # disjoint digit images for train, val and test
    rng = np.random.default_rng(seed)
    return {split: compose(digits[pools[split]], labels[pools[split]], n, size, rng)
            for split, n in counts.items()}
