"""The bundled photographs: natural images that ship inside scikit-image's and scikit-learn's wheels
(no download), as a pretraining source and a classification task with spatially held-out tests.

Each photograph is cut into `tile` x `tile` tiles, and a seeded shuffle gives every tile to one
split (train / val / test), so no test crop shares a pixel with a training crop. A crop is a random
`crop` x `crop` window inside one tile of its split, resized to `image_size`; its label is the
photograph it comes from. Crops are a pure function of (seed, split, index): the same on every
machine, in every process, after every restart.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from ..errors import ConvHeadsError
from .images import IMAGE_SUFFIXES, SPLITS, open_image

# Natural photographs of at least 300 x 300 pixels (synthetic images, drawings and the near-duplicate
# motorcycle_right are left out), named after their files.
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                  "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


@dataclass(frozen=True, kw_only=True)
class PhotoSettings:
    """How crops are cut from the bundled photographs."""
    tile: int = 64
    """Side of the tiles each photograph is cut into; every tile belongs to one split."""
    crop: int = 48
    """Side of a crop, in the photograph's pixels (at most `tile`); resized to image_size."""
    image_size: int = 32
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.crop <= self.tile:
            raise ConvHeadsError(f"the crop ({self.crop} px) must fit inside a tile ({self.tile} px): lower "
                                 f"crop or raise tile")
        v, t = self.val_fraction, self.test_fraction
        if not (0 < v < 1 and 0 < t < 1 and v + t < 1):
            raise ConvHeadsError(f"val_fraction and test_fraction must be in (0, 1) and sum below 1; got "
                                 f"{self.val_fraction} and {self.test_fraction}")


def photo_files() -> List[Path]:
    """The bundled photographs' files, in class order."""
    try:
        import skimage
    except ImportError:
        raise ConvHeadsError("the bundled photographs come with scikit-image: pip install scikit-image") from None
    import sklearn.datasets

    skimage_dir = Path(skimage.__file__).parent / "data"
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    files = [skimage_dir / f for f in SKIMAGE_PHOTOS] + [sklearn_dir / f for f in SKLEARN_PHOTOS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConvHeadsError(f"bundled photographs not found: {', '.join(missing)}; reinstall scikit-image / "
                             f"scikit-learn")
    return files


def load_photos() -> Dict[str, np.ndarray]:
    """{name: uint8 RGB array [H, W, 3]} for the bundled photographs."""
    return {f.stem: np.asarray(open_image(f)) for f in photo_files()}


def folder_photos(root: Path) -> Dict[str, np.ndarray]:
    """{relative path: uint8 RGB array} for every image under `root` (a pretraining source of one's own)."""
    root = Path(root)
    if not root.is_dir():
        raise ConvHeadsError(f"pretraining source {root} is not a folder")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ConvHeadsError(f"pretraining source {root} holds no images ({', '.join(IMAGE_SUFFIXES)}); point "
                             f"pretrain.path at a folder of images")
    return {str(f.relative_to(root)): np.asarray(open_image(f)) for f in files}


class PhotoCrops:
    """Crops of the photographs' tiles in one split: `crops.sample(i)` -> (uint8 [S, S, 3], label).

    `scale`: a range of crop sides relative to settings.crop (pretraining varies the scale); None:
    always settings.crop. `flip`: a random horizontal flip.
    """

    def __init__(self, photos: Dict[str, np.ndarray], settings: PhotoSettings, split: str,
                 scale: Tuple[float, float] = None, flip: bool = False):
        if split not in SPLITS:
            raise ConvHeadsError(f"split must be one of {SPLITS}; got {split!r}")
        if not photos:
            raise ConvHeadsError("no photographs to cut crops from: the source holds no images")
        self.settings, self.split, self.scale, self.flip = settings, split, scale, flip
        self.classes = list(photos)
        self.photos = [photos[c] for c in self.classes]
        biggest = max(settings.crop, int(settings.crop * scale[1]) if scale else 0)
        if biggest > settings.tile:
            raise ConvHeadsError(f"crops of up to {biggest} px do not fit in {settings.tile} px tiles; lower the crop "
                                 f"scale or raise tile")
        self.tiles = [split_tiles(p.shape[:2], settings, c)[split] for c, p in enumerate(self.photos)]
        for name, photo, tiles in zip(self.classes, self.photos, self.tiles):
            if not tiles:
                raise ConvHeadsError(f"photograph {name} ({photo.shape[1]} x {photo.shape[0]} px) has no "
                                     f"{settings.tile} px tile in split {split}: lower tile or use larger images")

    def sample(self, index: int) -> Tuple[np.ndarray, int]:
        s = self.settings
        rng = np.random.default_rng([s.seed, SPLITS.index(self.split), index])
        label = index % len(self.photos)  # classes take turns: every class has the same count
        top, left = self.tiles[label][rng.integers(len(self.tiles[label]))]
        side = s.crop if self.scale is None else int(round(s.crop * rng.uniform(*self.scale)))
        y, x = top + rng.integers(s.tile - side + 1), left + rng.integers(s.tile - side + 1)
        img = Image.fromarray(self.photos[label][y:y + side, x:x + side]).resize((s.image_size, s.image_size),
                                                                                  Image.BICUBIC)
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(img), label


def split_tiles(shape: Tuple[int, int], settings: PhotoSettings, salt: int) -> Dict[str, List[Tuple[int, int]]]:
    """{split: [(top, left), ...]}: a photograph's whole tiles, shuffled by (seed, salt) and dealt
    out by the fractions (at least one tile to each split when there are three)."""
    h, w = shape
    t = settings.tile
    tiles = [(r * t, c * t) for r in range(h // t) for c in range(w // t)]
    order = np.random.default_rng([settings.seed, salt]).permutation(len(tiles))
    n_test = max(1, int(round(len(tiles) * settings.test_fraction)))
    n_val = max(1, int(round(len(tiles) * settings.val_fraction)))
    picked = [tiles[i] for i in order]
    return {"test": picked[:n_test], "val": picked[n_test:n_test + n_val], "train": picked[n_test + n_val:]}
