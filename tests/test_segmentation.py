"""Semantic segmentation: metrics, the digits scenes, the model on a replaced backbone, ADE20K-style
folders and their bad input, and the pipeline end to end (Prefect flow, MLflow registry)."""
import functools
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import seg_params
from PIL import Image

import convheads
from convheads import ConvHeadsError
from convheads.data.scenes import digit_scenes
from convheads.engine.evaluation import evaluate_segmentation
from pipeline import preflight
from pipeline.config import validate
from pipeline.dag import STAGES
from pipeline.runner import execute


def test_miou_and_pixel_accuracy_of_a_known_prediction():
    """4 classes; class 3 appears in neither prediction nor mask, 255 is ignored."""
    mask = torch.tensor([[0, 0, 1, 1],
                         [0, 2, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 2, 0]])  # the ignored pixel's prediction counts nowhere
    logits = torch.nn.functional.one_hot(pred, 4).permute(2, 0, 1).float()[None]
    result = evaluate_segmentation(lambda x: logits, [(torch.zeros(1, 3, 2, 4), mask[None])], num_classes=4,
                                   progress=False)
    # class 0: 2 of 3 pixels (union 3: one 0 predicted as 1) ; class 1: 2 right, union 4; class 2: 1 of 2
    assert result["iou"][:3] == pytest.approx([2 / 3, 2 / 4, 1 / 2])
    assert math.isnan(result["iou"][3])  # absent from both: left out of the mean
    assert result["miou"] == pytest.approx((2 / 3 + 2 / 4 + 1 / 2) / 3)
    assert result["pixel_acc"] == pytest.approx(5 / 7)
    with pytest.raises(ConvHeadsError, match="every pixel"):
        evaluate_segmentation(lambda x: logits, [(torch.zeros(1, 3, 2, 4), torch.full((1, 2, 4), 255))], 4,
                              progress=False)


def test_digit_scenes_are_deterministic_given_the_seed():
    counts = {"train": 6, "val": 2, "test": 2}
    a, b, c = digit_scenes(32, 0, counts), digit_scenes(32, 0, counts), digit_scenes(32, 1, counts)
    for split in counts:
        assert np.array_equal(a[split][0], b[split][0]) and np.array_equal(a[split][1], b[split][1])
        assert a[split][0].shape == (counts[split], 32, 32, 3) and a[split][1].shape == (counts[split], 32, 32)
    assert not np.array_equal(a["train"][1], c["train"][1])
    labels = np.unique(np.concatenate([m.ravel() for _, m in a.values()]))
    assert labels[0] == 0 and labels.max() <= 10 and len(labels) > 3  # background + digit classes + 1


def test_a_replaced_backbone_keeps_every_feature_map_and_saves_and_loads(tmp_path):
    model = convheads.create_segmentation_model("vit_tiny_patch16_224", 5, feature_blocks=[0, 2, 3], img_size=32,
                                                patch_size=4, embed_dim=32, depth=4, num_heads=4, reg_tokens=2).eval()
    x = torch.randn(4, 3, 32, 32)
    scores = convheads.score_heads(model, [x], progress=False)
    convheads.replace_heads(model, convheads.Selection.from_blocks([0, 2], 4), init="attention", scores=scores)
    convheads.replace_heads(model, convheads.Selection({1: [0, 3]}))
    features = model.features(x)  # replaced blocks 0 and 2 feed the head; prefix tokens are dropped
    assert [tuple(f.shape) for f in features] == [(4, 32, 8, 8)] * 3
    assert model(x).shape == (4, 5, 32, 32)
    assert convheads.replaced_selection(model).heads == {0: [0, 1, 2, 3], 1: [0, 3], 2: [0, 1, 2, 3]}
    convheads.save_model(model, tmp_path / "m.pt")
    loaded = convheads.load_model(tmp_path / "m.pt")
    assert isinstance(loaded, convheads.SegmentationModel) and loaded.feature_blocks == [0, 2, 3]
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ConvHeadsError, match=r"feature_blocks \[4\] must be .* 0..3"):
        convheads.SegmentationModel(convheads.as_vit(model), 5, [4])


@pytest.mark.parametrize("variant", ["depthwise_global", "fixed"])
def test_a_replaced_segmentation_model_trains_on_the_engine(tmp_path, variant):
    """The engine's options on a segmentation model with main's variants: bf16, accumulation, EMA and
    a checkpoint; the head in groups of its own at HEAD_LR_SCALE x lr; 255 counts nowhere."""
    from convheads.engine.training import TrainSettings, param_groups, train
    from convheads.segmentation import HEAD_LR_SCALE

    model = convheads.create_segmentation_model("vit_tiny_patch16_224", 3, feature_blocks=[0, 1], img_size=16,
                                                patch_size=4, embed_dim=16, depth=2, num_heads=2)
    x = torch.randn(8, 3, 16, 16)
    masks = torch.randint(0, 3, (8, 16, 16))
    masks[:, 0] = 255
    scores = convheads.score_heads(model, [x], progress=False)
    convheads.replace_heads(model, convheads.Selection.from_blocks([1], 2), variant=variant, init="attention",
                            scores=scores)
    head = {id(p) for p in model.head.parameters()}
    groups = param_groups(model, 0.05)
    assert {g.get("lr_scale", 1.0) for g in groups if {id(p) for p in g["params"]} <= head} == {HEAD_LR_SCALE}
    assert not any(id(p) in head for g in groups if g.get("lr_scale", 1.0) != HEAD_LR_SCALE for p in g["params"])
    assert model.uses_every_parameter
    batches = [(x[:4], masks[:4]), (x[4:], masks[4:])]
    settings = TrainSettings(epochs=2, lr=1e-3, warmup_epochs=0, accumulation=2, ema_decay=0.9)
    history = train(model, batches, settings, batches, progress=False, precision="bf16",
                    checkpoint=tmp_path / "resume.pt", ignore_index=255,
                    validate=functools.partial(evaluate_segmentation, num_classes=3))
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["lr"] < 1e-3
    assert {"train_pixel_acc", "val_miou", "val_pixel_acc", "val_loss"} <= set(history[0])
    assert all(0 <= h["train_pixel_acc"] <= 1 and math.isfinite(h["val_loss"]) for h in history)
    assert model(x).shape == (8, 3, 16, 16)
    earlier = convheads.create_segmentation_model("vit_tiny_patch16_224", 3, feature_blocks=[0], img_size=16,
                                                  patch_size=4, embed_dim=16, depth=2, num_heads=2)
    assert not earlier.uses_every_parameter  # block 1 never runs: DDP must look for unused parameters


def write_pairs(root: Path, n: int = 12, size=(16, 16), classes=3) -> Path:
    """An ADE20K-style folder: n training and 3 validation pairs, labels 0..classes-1 (and some 255)."""
    rng = np.random.default_rng(0)
    for folder, count in (("training", n), ("validation", 3)):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"images/{folder}/{i}.jpg")
            labels = rng.integers(0, classes, size, dtype=np.uint8)
            labels[0, 0] = 255
            Image.fromarray(labels).save(root / f"annotations/{folder}/{i}.png")
    return root


def folder_config(tmp_path, **segmentation):
    params = seg_params(tmp_path / "run", image_size=16, **segmentation)
    params["data"].update(source="folder", path=str(tmp_path / "ade"), val_fraction=0.4)
    return validate(params)


def test_an_ade20k_style_folder_is_read_in_place_with_its_class_names(tmp_path):
    write_pairs(tmp_path / "ade")
    (tmp_path / "ade/classes.txt").write_text("sky\nroad\ncar\n")
    cfg = folder_config(tmp_path)
    preflight.check(cfg)
    summary = execute(STAGES["data"], cfg).summary
    assert summary["classes"] == ["sky", "road", "car"] and summary["counts"]["test"] == 3
    assert sum(summary["counts"].values()) == 15 and summary["root"] == str(tmp_path / "ade")
    reduced = execute(STAGES["data"], folder_config(tmp_path, reduce_zero_label=True, num_classes=2)).summary
    assert reduced["classes"] == ["0", "1"]  # 0 is ignored, 1 and 2 became 0 and 1


@pytest.mark.parametrize("damage, message", [
    (lambda r: Image.new("L", (8, 16)).save(r / "annotations/training/2.png"),
     r"annotations/training/2.png: mask is 8 x 16 but its image images/training/2.jpg is 16 x 16"),
    (lambda r: Image.fromarray(np.full((16, 16), 7, np.uint8)).save(r / "annotations/training/1.png"),
     r"labels outside 0..2 that are not the ignore index 255: .*annotations/training/1.png has 7"),
    (lambda r: (r / "annotations/training/3.png").unlink(),
     r"1 image\(s\) in .* have no mask \(expected annotations/training/<name>.png\): images/training/3.jpg"),
    (lambda r: (r / "images/validation/0.jpg").unlink(),
     r"1 mask\(s\) in .* have no image .*: annotations/validation/0.png"),
    (lambda r: Image.new("RGB", (16, 16)).save(r / "annotations/training/0.png"),
     r"mask .*annotations/training/0.png has mode RGB \(3 channels\); masks must be single-channel"),
])
def test_bad_segmentation_data_fails_naming_the_file(tmp_path, damage, message):
    write_pairs(tmp_path / "ade")
    (tmp_path / "ade/classes.txt").write_text("sky\nroad\ncar\n")
    damage(tmp_path / "ade")
    cfg = folder_config(tmp_path)
    with pytest.raises(ConvHeadsError, match=message):
        preflight.check(cfg)  # pairing is checked before any work; sizes, modes and labels by the data stage
        execute(STAGES["data"], cfg)
    assert not (Path(cfg.paths.data) / "manifest.csv").exists()


@pytest.mark.parametrize("change, message", [
    ({"image_size": 30}, r"segmentation.image_size: image size 30 x 30 is not divisible by the patch size 4 x 4"),
    ({"feature_blocks": [1, 2]}, r"segmentation.feature_blocks: feature_blocks \[1, 2\] must be .* in 0..1"),
])
def test_a_model_that_does_not_fit_the_segmentation_settings_fails_before_any_work(tmp_path, change, message):
    with pytest.raises(ConvHeadsError, match=message):
        preflight.check(validate(seg_params(tmp_path, **change)))


@pytest.mark.slow
def test_the_segmentation_flow_registers_a_model_with_mask_shaped_output(prefect_api, tmp_path):
    from flows.compress import compress

    params = seg_params(tmp_path)
    params["registry"].update(min_speedup=0.01, max_drop=1.0)
    cfg = validate(params)
    result = compress(config=cfg)
    out = Path(cfg.paths.outputs)
    metrics = json.loads((out / "evaluate/metrics.json").read_text())
    assert set(metrics["compressed"]) == {"miou", "pixel_acc", "loss"}
    assert result["compressed_miou"] == pytest.approx(metrics["compressed"]["miou"])
    assert result["miou_drop"] == pytest.approx(metrics["baseline"]["miou"] - metrics["compressed"]["miou"])
    assert (out / "evaluate/predictions.png").read_bytes()[:4] == b"\x89PNG"
    per_class = (out / "evaluate/per_class_iou.csv").read_text().splitlines()
    assert per_class[0] == "class,baseline_iou,replaced_iou,compressed_iou" and len(per_class) == 12
    assert per_class[1].startswith("background,") and per_class[-1].startswith("digit 9,")

    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["evaluate/compressed/miou"] == pytest.approx(metrics["compressed"]["miou"])
    registry = result["registry"]
    assert registry["promotion"] == "champion" and registry["reasons"][0].startswith("mIoU drop")
    version = client.get_model_version(registry["model_name"], str(registry["version"]))
    assert float(version.tags["miou"]) == metrics["compressed"]["miou"]
    info = mlflow.models.get_model_info(version.source)
    assert tuple(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 11, 32, 32)
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{registry['model_name']}@champion")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    torch.testing.assert_close(torch.as_tensor(np.asarray(loaded.predict(x))),
                               convheads.load_model(out / "recover/model.pt")(torch.from_numpy(x)).detach(),
                               atol=1e-4, rtol=1e-4)
