"""Your data: layouts read in place, incremental hashing, bad input, image modes, transforms at the
model's size, and reproducible augmentation in DataLoader workers."""
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_params
from PIL import Image

from convheads import ConvHeadsError
from convheads.data.images import image_transform
from convheads.data.loaders import ManifestDataset
from convheads.data.manifest import build_manifest, scan_csv, scan_folder
from pipeline.config import load_config, validate
from pipeline.dag import STAGES
from pipeline.runner import execute


def image(path, mode="RGB", size=(12, 10), value=None, fmt=None):
    """A small image file; value: a fill (default from the path, so files differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = value if value is not None else sum(path.as_posix().encode()) % 200
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], fill, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size, fill if mode in ("L", "P", "1") else (fill,) * len(mode)).save(path, format=fmt)
    return path


def manifest(source, tmp_path, **kwargs):
    stats = build_manifest(source, tmp_path / "manifest.csv", tmp_path / "cache.db", progress=False, **kwargs)
    return stats, pd.read_csv(tmp_path / "manifest.csv", keep_default_na=False)


def test_imagenet_layout_val_is_the_test_split_and_val_is_carved_from_train(tmp_path):
    for c in ("n01", "n02"):
        for i in range(12):
            image(tmp_path / f"in/train/{c}/{c}_{i}.JPEG", fmt="JPEG")
        for i in range(3):
            image(tmp_path / f"in/val/{c}/val_{c}_{i}.JPEG", fmt="JPEG")
    (tmp_path / "in/train/n01/notes.txt").write_text("not an image")
    source = scan_folder(tmp_path / "in")
    stats, rows = manifest(source, tmp_path, val_fraction=0.25)
    assert stats.classes == ["n01", "n02"] and stats.counts == {"train": 18, "val": 6, "test": 6}
    assert set(rows[rows.split == "test"].path.str[:4]) == {"val/"}  # ImageNet's val/ is what results report on
    assert set(rows[rows.split == "val"].path.str[:6]) == {"train/"} and source.ignored == 1
    # carving is by path: adding images moves no existing image to another split
    image(tmp_path / "in/train/n01/n01_new.JPEG", fmt="JPEG")
    _, grown = manifest(scan_folder(tmp_path / "in"), tmp_path, val_fraction=0.25)
    assert grown.set_index("path").loc[rows.path, "split"].tolist() == rows.split.tolist()


def test_a_csv_source_with_and_without_splits(tmp_path):
    for i in range(6):
        image(tmp_path / f"imgs/{i}.png")
    (tmp_path / "labels.csv").write_text("path,label,split\n" + "".join(
        f"imgs/{i}.png,{'10' if i % 2 else '9'},{['train', 'train', 'train', 'train', 'val', 'test'][i]}\n"
        for i in range(6)))
    stats, rows = manifest(scan_csv(tmp_path / "labels.csv"), tmp_path)
    assert stats.classes == ["9", "10"]  # integer labels sort as numbers
    assert rows.split.tolist() == ["train"] * 4 + ["val", "test"] and rows.label.tolist() == [0, 1, 0, 1, 0, 1]
    for i in range(6, 20):
        image(tmp_path / f"imgs/{i}.png")
    (tmp_path / "nosplit.csv").write_text("label,path\n" + "".join(f"{'ab'[i % 2]},imgs/{i}.png\n" for i in range(20)))
    stats, rows = manifest(scan_csv(tmp_path / "nosplit.csv", classes=["b", "a"]), tmp_path, val_fraction=0.25,
                           test_fraction=0.25)
    assert rows["class"].tolist() == list("ab" * 10) and rows.label.tolist() == [1, 0] * 10
    assert stats.counts == {"train": 8, "val": 7, "test": 5}


def test_rerunning_hashes_only_new_or_changed_files(tmp_path):
    for c in "ab":
        for i in range(8):
            image(tmp_path / f"src/{c}/{i}.png")
    first, before = manifest(scan_folder(tmp_path / "src"), tmp_path)
    assert (first.hashed, first.cached) == (16, 0)
    again, same = manifest(scan_folder(tmp_path / "src"), tmp_path)
    assert (again.hashed, again.cached) == (0, 16) and again.data_version == first.data_version
    image(tmp_path / "src/a/new.png")
    image(tmp_path / "src/b/3.png", value=7, size=(13, 10))
    changed, after = manifest(scan_folder(tmp_path / "src"), tmp_path)
    assert (changed.hashed, changed.cached) == (2, 15) and changed.data_version != first.data_version
    assert after.set_index("path").sha256["b/3.png"] != before.set_index("path").sha256["b/3.png"]


@pytest.mark.parametrize("setup, match", [
    (lambda p: (p / "src/b/empty.png").write_bytes(b""), r"not readable images: .*b/empty.png \(the file is empty\)"),
    (lambda p: (p / "src/b/cut.jpg").write_bytes(_jpeg(p)[:-200]), r"not readable images: .*b/cut.jpg \(.*truncated"),
    (lambda p: (p / "src/c").mkdir(), r"class folder .*src/c holds no images .*add images or remove the folder"),
    (lambda p: Image.new("F", (4, 4)).save(p / "src/b/float.tif"), r"float.tif \(image mode F is not supported"),
])
def test_bad_images_and_folders_are_named_with_the_fix(tmp_path, setup, match):
    for c in "ab":
        for i in range(4):
            image(tmp_path / f"src/{c}/{i}.png")
    setup(tmp_path)
    with pytest.raises(ConvHeadsError, match=match):
        manifest(scan_folder(tmp_path / "src"), tmp_path)


def _jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("layout, match", [
    ({"train/a/0.png": 1, "train/b/0.png": 1, "test/a/0.png": 1, "test/zebra/0.png": 1},
     r"test has class folders outside the class list: zebra; every class needs training images"),
    ({"train/a/0.png": 1, "train/b/0.png": 1, "val/0.png": 1},
     r"val holds images directly .*ImageNet's raw validation layout.*data.source=csv"),
    ({"train/a/0.png": 1, "train/b/0.png": 1, "test/a/0.png": 1, "extra/b/0.png": 1},
     r"has split folders \(train, test\) and also extra"),
    ({"a/0.png": 1, "b/0.png": 1}, r"the (val|test) split has no images \(2 images in all.*raise the fraction"),
])
def test_bad_layouts_are_named_with_the_fix(tmp_path, layout, match):
    for rel in layout:
        image(tmp_path / "src" / rel)
    with pytest.raises(ConvHeadsError, match=match):
        manifest(scan_folder(tmp_path / "src"), tmp_path)


def test_bad_csv_rows_are_named_with_the_fix(tmp_path):
    for i in range(4):
        image(tmp_path / f"{i}.png")
    for text, classes, match in [
        ("path,label\n0.png,a\n1.png,b\nmissing.png,a\ngone.png,b\n", None,
         r"2 listed image file\(s\) not found: .*missing.png"),
        ("path,label\n0.png,a\n1.png,b\n2.png,cat\n", ["a", "b"], r"labels outside the class list: cat; add them"),
        ("path,label,split\n0.png,a,train\n1.png,b,tset\n", None,
         r"split values must be train, val, test or empty; found tset"),
        ("file,class\n0.png,a\n", None, r"has columns file, class; it needs path and label"),
    ]:
        (tmp_path / "l.csv").write_text(text)
        with pytest.raises(ConvHeadsError, match=match):
            manifest(scan_csv(tmp_path / "l.csv", classes), tmp_path)


def test_image_modes_are_converted_to_rgb_as_documented(tmp_path):
    image(tmp_path / "src/train/a/gray.png", "L", value=100)
    image(tmp_path / "src/train/b/deep.png", "I;16", value=40000)  # 16-bit: 40000 / 256 = 156
    image(tmp_path / "src/val/a/rgba.png", "RGBA", value=50)
    image(tmp_path / "src/val/b/palette.png", "P", value=3)
    image(tmp_path / "src/test/a/rgb.png")
    image(tmp_path / "src/test/b/rgb.png")
    stats, _ = manifest(scan_folder(tmp_path / "src"), tmp_path)
    assert sum(stats.modes.values()) == 6 and {"L", "RGBA", "P", "RGB"} <= set(stats.modes)
    assert set(stats.modes) - {"L", "RGBA", "P", "RGB"} <= {"I;16", "I"}
    pixels = {}
    for split in ("train", "val"):
        ds = ManifestDataset(tmp_path / "manifest.csv", tmp_path / "src", split)
        pixels.update({p.decode().split("/")[-1]: ds[i][0] for i, p in enumerate(ds.paths)})
    assert all(x.shape == (3, 10, 12) for x in pixels.values())
    assert torch.allclose(pixels["gray.png"], torch.full((3, 10, 12), 100 / 255))
    assert torch.allclose(pixels["rgba.png"], torch.full((3, 10, 12), 50 / 255))  # alpha dropped
    assert torch.allclose(pixels["deep.png"], torch.full((3, 10, 12), 156 / 255))  # scaled, not clipped to 255


def folder_config(tmp_path, per_class=8, **data):
    for c in "ab":
        for i in range(per_class):
            image(tmp_path / f"src/{c}/{i}.png", size=(40, 30))
    return validate({**tiny_params(tmp_path), "data": {"source": "folder", "path": str(tmp_path / "src"), **data}})


def test_loaders_use_timms_transforms_at_the_models_size_and_augment_reproducibly(tmp_path):
    from convheads import create_model
    from pipeline.loaders import loader
    from pipeline.problems import data_config
    cfg = folder_config(tmp_path, per_class=12)
    execute(STAGES["data"], cfg)
    model = create_model("vit_small_patch14_dinov2.lvd142m", img_size=28, depth=1, num_classes=2)
    dc = data_config(cfg, model)
    assert dc["input_size"] == (3, 28, 28) and dc["mean"] == (0.485, 0.456, 0.406) and dc["crop_pct"] == 1.0
    assert "RandomResizedCrop" in repr(image_transform(dc, "timm")) and "Flip" in repr(image_transform(dc, "timm"))
    light = repr(image_transform(dc, "light"))
    assert "RandomAffine" in light and "Flip" not in light and "RandomResizedCrop" not in light

    def epoch(workers, persistent):
        torch.manual_seed(3)
        settings = {"num_workers": workers, "persistent_workers": persistent}
        batches = loader(validate({**cfg.model_dump(), "loader": settings}),
                         model, "train", 4, train=True, augment="timm")
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    x0, y0 = epoch(0, False)
    assert x0.shape[1:] == (3, 28, 28)
    x2, y2 = epoch(2, True)  # the same augmentation whatever the workers
    assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_an_image_broken_after_the_data_stage_fails_training_naming_it(tmp_path):
    from convheads import create_model
    from pipeline.loaders import loader
    cfg = folder_config(tmp_path, **{"val_fraction": 0.25, "test_fraction": 0.25})
    execute(STAGES["data"], cfg)
    (tmp_path / "src/a/3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    model = create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=2)
    cfg = validate({**cfg.model_dump(), "loader": {"num_workers": 1}})
    with pytest.raises(ConvHeadsError) as failure:
        for split in ("train", "val", "test"):
            list(loader(cfg, model, split, 4))
    assert str(failure.value).startswith("cannot read image ") and "src/a/3.png" in str(failure.value)
    assert "Traceback" not in str(failure.value) and "rerun the data stage" in str(failure.value)


def test_touching_files_reruns_the_data_stage_but_not_training(tmp_path):
    import os
    cfg = folder_config(tmp_path, **{"val_fraction": 0.25, "test_fraction": 0.25})
    data = execute(STAGES["data"], cfg)
    execute(STAGES["baseline"], validate({**cfg.model_dump(), "baseline": {"epochs": 1, "batch_size": 64}}))
    os.utime(tmp_path / "src/a/0.png", ns=(1, 1))
    again = execute(STAGES["data"], cfg)
    assert not again.skipped and again.summary["data_version"] == data.summary["data_version"]
    shorter = validate({**cfg.model_dump(), "baseline": {"epochs": 1, "batch_size": 64}})
    assert execute(STAGES["baseline"], shorter).skipped


def test_a_dvc_tracked_folder_is_used_as_it_is_and_its_hash_recorded(tmp_path):
    cfg = folder_config(tmp_path, **{"val_fraction": 0.25, "test_fraction": 0.25})
    (tmp_path / "src.dvc").write_text("outs:\n- md5: 3f2a1b.dir\n  size: 4242\n  nfiles: 16\n  hash: md5\n  path: src\n"
                                      "deps:\n- path: datasets/src\n  repo:\n    url: https://example.com/data.git\n"
                                      "    rev_lock: 0123abcd\n")
    summary = execute(STAGES["data"], cfg).summary
    assert summary["dvc"] == {"file": str(tmp_path / "src.dvc"), "md5": "3f2a1b.dir", "size": 4242, "nfiles": 16,
                              "import": {"url": "https://example.com/data.git", "rev_lock": "0123abcd"}}
    meta = json.loads((tmp_path / "data/dataset/meta.json").read_text())
    assert meta["root"] == str(tmp_path / "src") and meta["dvc"]["md5"] == "3f2a1b.dir"


def test_model_kwargs_apply_to_the_digits_model_only_unless_given():
    digits = load_config(None, [])
    assert digits.model.kwargs is None and digits.model.build_kwargs["embed_dim"] == 128
    pretrained = load_config(None, ["model.pretrained=true", "model.name=vit_small_patch14_dinov2.lvd142m"])
    assert pretrained.model.build_kwargs == {}
    assert load_config(None, ["model.checkpoint=w.pth"]).model.build_kwargs == {}
    chosen = load_config(None, ["model.pretrained=true", "model.kwargs.img_size=336"])
    assert chosen.model.build_kwargs == {"img_size": 336}
    assert load_config(None, ["model.kwargs={img_size: 64, depth: 2}", "model.kwargs={}"]).model.build_kwargs == {}
    with pytest.raises(ConvHeadsError, match="baseline.augment: Input should be 'auto', 'timm', 'light' or 'none'"):
        load_config(None, ["baseline.augment=false"])


def test_bad_input_fails_in_the_preflight_or_once_not_after_retries(tmp_path):
    from prefect.states import Failed

    from flows.compress import transient
    from pipeline import preflight
    cfg = folder_config(tmp_path)
    (tmp_path / "src/zebra").mkdir()
    with pytest.raises(ConvHeadsError, match=r"data.path: class folder .*src/zebra holds no images"):
        preflight.check(cfg)  # the layout is checked in seconds, before any stage
    assert not transient(None, None, Failed(data=ConvHeadsError("1 file(s) are not readable images: ...")))
    assert transient(None, None, Failed(data=OSError("connection reset by peer")))  # a download may pass next time


@pytest.mark.slow
def test_loader_workers_forked_inside_a_prefect_task_exit_cleanly(prefect_api):
    """Forked workers inherit Prefect's thread-exit callbacks; left in place they fail at the worker's
    exit (code 1) and the loader prints a "worker exited unexpectedly" traceback after every stage."""
    from prefect import flow, task
    from torch.utils.data import TensorDataset

    from convheads.data.loaders import make_loader

    @task
    def read_twice():
        loader = make_loader(TensorDataset(torch.arange(32.0)), batch_size=8, num_workers=2)
        batches = [b for _ in range(2) for (b,) in loader]
        it = loader._iterator  # persistent workers: the iterator the loader keeps
        workers = list(it._workers)
        it._shutdown_workers()
        return len(batches), [w.exitcode for w in workers]

    @flow
    def read():
        return read_twice()

    assert read() == (8, [0, 0])
