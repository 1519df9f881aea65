"""The configured data source as found on disk, and a cheap listing of it (names, sizes and
times; no file read): what the data stage's fingerprint and DVC's `source` stage watch, and what
the preflight checks before any work."""
import json
from pathlib import Path
from typing import Optional

from convheads.data.manifest import Item, Source, listing_digest, scan_csv, scan_folder
from convheads.data.segmentation import CLASSES_FILE, scan_pairs

from .config import DataConfig, PipelineConfig

GENERATED = ("digits", "photos", "torchvision")   # sources the data stage writes as images into its own folder


def source(cfg: DataConfig, generated_in: Optional[Path] = None) -> Source:
    """The configured dataset as found on disk (generated sources: in `generated_in`)."""
    if cfg.source in GENERATED:
        return scan_folder(generated_in)
    if cfg.source == "csv":
        return scan_csv(Path(cfg.path), cfg.classes)
    return scan_folder(Path(cfg.path), cfg.classes)


def source_listing(cfg: PipelineConfig) -> Optional[str]:
    """What the data stage's fingerprint watches besides the configuration: a digest of the names,
    sizes and times of a folder or CSV source's images (None for generated sources)."""
    d = cfg.data
    if d.source in GENERATED:
        return None
    found = pair_source(Path(d.path)) if cfg.task == "segmentation" else source(d)
    dvc_file = Path(d.path).with_name(Path(d.path).name + ".dvc")
    if dvc_file.is_file():
        found.extra_files.append(dvc_file)
    return listing_digest(found)


def pair_source(root: Path) -> Source:
    """An ADE20K-style folder as a Source of its images and masks (what the listing digest reads)."""
    found = scan_pairs(root)
    items = [Item(path, "", folder) for folder, pairs in found.pairs.items() for pair in pairs for path in pair]
    extra = [root / CLASSES_FILE] if (root / CLASSES_FILE).is_file() else []
    return Source(root, [], "pairs", tuple(found.pairs), lambda: iter(items), extra_files=extra)


def write_listing(cfg: PipelineConfig, path: Path) -> None:
    """The source listing as a small file: DVC reruns the data stage when it changes (dvc.yaml)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": cfg.data.source, "path": cfg.data.path,
                                "listing": source_listing(cfg)}, indent=2) + "\n")
