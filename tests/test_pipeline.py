"""The stages, run as the Prefect flow and DVC run them: outputs, skipping, resuming, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import PROJECT, tiny_params
from PIL import Image

from convheads import ConvHeadsError, create_model, load_model, replaced_selection
from pipeline import preflight
from pipeline.config import TASK_DEFAULTS, PipelineConfig, load_config, validate
from pipeline.dag import STAGES
from pipeline.params_file import check_params_file
from pipeline.runner import execute, read_record


def run_all(cfg):
    return {name: execute(stage, cfg) for name, stage in STAGES.items()}


def with_changes(cfg, **sections):
    data = cfg.model_dump(mode="json")
    for section, values in sections.items():
        data[section].update(values)
    return validate(data)


def test_the_pipeline_writes_every_output_and_reruns_only_what_changed(tiny_config):
    first = run_all(tiny_config)
    assert not any(o.skipped for o in first.values())
    out = tiny_config.paths.outputs
    meta = json.loads(open(f"{tiny_config.paths.data}/meta.json").read())
    assert meta["counts"] == {"train": 1257, "val": 270, "test": 270} and meta["classes"] == list("0123456789")
    manifest = pd.read_csv(f"{tiny_config.paths.data}/manifest.csv")
    assert len(manifest) == 1797 and set(manifest.split) == {"train", "val", "test"}
    assert len(first["data"].summary["data_version"]) == 64

    selection = json.loads(open(f"{out}/select/selection.json").read())
    assert sum(len(h) for h in selection["heads"].values()) == 4  # half of 2 blocks x 4 heads
    assert open(f"{out}/select/heatmap.png", "rb").read(4) == b"\x89PNG"
    scores = pd.read_csv(f"{out}/score/scores.csv")
    assert list(scores.columns) == ["block", "head", "sigma_h", "sigma_b", "local_share"] and len(scores) == 8
    assert scores.local_share.between(0, 1).all()
    metrics = json.loads(open(f"{out}/evaluate/metrics.json").read())
    assert set(metrics) >= {"baseline", "replaced", "compressed", "top1_drop"}
    assert metrics["top1_drop"] == pytest.approx(metrics["baseline"]["top1"] - metrics["compressed"]["top1"])
    bench = pd.read_csv(f"{out}/benchmark/benchmark.csv")
    assert set(bench.model) == {"baseline", "compressed"} and set(bench.batch_size) == {1, 4}
    assert set(bench.runtime) == {"onnxruntime", "eager"}  # the export as deployed, and PyTorch
    assert {"infer_samples_per_sec", "infer_step_time", "param_count", "infer_gmacs"} <= set(bench.columns)
    assert len(pd.read_csv(f"{out}/baseline/history.csv")) == 2
    recovered = replaced_selection(load_model(f"{out}/recover/model.pt"))
    assert recovered.heads == {int(b): h for b, h in selection["heads"].items()}  # the selected heads, replaced

    again = run_all(tiny_config)
    assert all(o.skipped for o in again.values())

    changed = run_all(with_changes(tiny_config, recover={"lr": 2e-3}))
    assert [n for n, o in changed.items() if not o.skipped] == ["recover", "evaluate", "benchmark"]


@pytest.mark.slow
def test_same_params_same_seed_same_metrics(tmp_path):
    results = []
    for run in ("a", "b"):
        cfg = validate(tiny_params(tmp_path / run))
        run_all(cfg)
        results.append((read_record(cfg, "evaluate")["summary"], read_record(cfg, "data")["summary"]["data_version"],
                        open(f"{cfg.paths.outputs}/select/selection.json").read()))
    assert results[0] == results[1]


@pytest.mark.slow
def test_an_interrupted_stage_leaves_no_outputs_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    import pipeline.finetune

    cfg = validate({**tiny_params(tmp_path / "x"), "recover": {"epochs": 2, "batch_size": 64}})
    for name in ("data", "baseline", "score", "select", "replace"):
        execute(STAGES[name], cfg)
    real_train = pipeline.finetune.train

    def interrupted(*args, **kwargs):
        def stop(row):
            if row["epoch"] == 1:
                raise KeyboardInterrupt
        return real_train(*args, **{**kwargs, "on_epoch": stop})

    monkeypatch.setattr(pipeline.finetune, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute(STAGES["recover"], cfg)
    assert not (tmp_path / "x/outputs/recover").exists()
    assert list((tmp_path / "x/outputs").glob(".recover.*.partial/resume.pt"))

    epochs_run = []
    monkeypatch.setattr(pipeline.finetune, "train",
                        lambda *a, **k: real_train(*a, **{**k, "on_epoch": epochs_run.append}))
    resumed = execute(STAGES["recover"], cfg)
    assert [r["epoch"] for r in epochs_run] == [2]  # epoch 1 came from the checkpoint
    assert not list((tmp_path / "x/outputs").glob(".recover.*"))

    straight = validate({**tiny_params(tmp_path / "y"), "recover": {"epochs": 2, "batch_size": 64}})
    run_all(straight)
    assert resumed.summary == read_record(straight, "recover")["summary"]
    a, b = (load_model(f"{c.paths.outputs}/recover/model.pt").state_dict() for c in (cfg, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)


def folder_dataset(root, classes=("cat", "dog"), per_class=6, size=(20, 24)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * i, 100, 0 if c == "cat" else 255)).save(root / c / f"{i}.png")


def test_an_image_folder_is_versioned_in_place_and_fed_at_the_models_size(tmp_path):
    import hashlib

    from pipeline.loaders import loader
    folder_dataset(tmp_path / "src", per_class=10)
    cfg = validate({**tiny_params(tmp_path), "data": {"source": "folder", "path": str(tmp_path / "src"),
                                                      "val_fraction": 0.25, "test_fraction": 0.25}})
    summary = execute(STAGES["data"], cfg).summary
    assert summary["classes"] == ["cat", "dog"] and summary["counts"] == {"train": 8, "val": 7, "test": 5}
    data = tmp_path / "data/dataset"
    assert sorted(p.name for p in data.iterdir()) == ["manifest.csv", "meta.json", "stage.json"]  # no image copied
    assert summary["data_version"] == hashlib.sha256((data / "manifest.csv").read_bytes()).hexdigest()
    manifest = pd.read_csv(data / "manifest.csv")
    assert list(manifest.columns) == ["path", "label", "class", "split", "size", "sha256"]
    assert manifest.path[0] == "cat/0.png" and manifest["size"][0] == (tmp_path / "src/cat/0.png").stat().st_size
    images, labels = next(iter(loader(cfg, create_model("vit_tiny_patch16_224", img_size=16, patch_size=4,
                                                            num_classes=2), "test", 8)))
    assert images.shape == (5, 3, 16, 16) and labels.tolist() == manifest[manifest.split == "test"].label.tolist()
    # a changed source folder is a new input: the stage reruns
    Image.new("RGB", (20, 24)).save(tmp_path / "src/cat/extra.png")
    rerun = execute(STAGES["data"], cfg)
    assert not rerun.skipped and rerun.summary["data_version"] != summary["data_version"]


@pytest.mark.parametrize("content", [b"", b"not an image"])
def test_empty_or_corrupt_images_are_named(tmp_path, content):
    folder_dataset(tmp_path / "src")
    (tmp_path / "src/dog/broken.png").write_bytes(content)
    cfg = validate({**tiny_params(tmp_path), "data": {"source": "folder", "path": str(tmp_path / "src")}})
    with pytest.raises(ConvHeadsError, match=r"1 file\(s\) are not readable images: .*dog/broken.png \(.+\); "
                                             r"remove or replace them"):
        execute(STAGES["data"], cfg)
    assert not (tmp_path / "data/dataset").exists()


def test_preflight_names_the_bad_key_or_file(tmp_path):
    base = tiny_params(tmp_path)
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    for change, match in [
        ({"model": {"name": "vit_tiny_patch16_22"}}, "model: unknown timm model"),
        ({"model": {"checkpoint": str(tmp_path / "missing.pt")}}, "checkpoint file not found"),
        ({"model": {"checkpoint": str(tmp_path / "wrong.pt")}},
         r"model.checkpoint: the checkpoint .*wrong.pt does not fit"),
        ({"data": {"source": "folder", "path": str(tmp_path / "nowhere")}}, "data.path: .*nowhere is not a folder"),
        ({"select": {"blocks": [5]}}, r"select.blocks: the selection names block 5 but the model has 2 blocks"),
        ({"select": {"blocks": [1, 1]}}, r"select.blocks: selection lists a block twice: \[1, 1\]"),
        ({"select": {"count": 9, "granularity": "head"}}, r"select.count: .* from 1 to 8 \(the model's heads\); got 9"),
        ({"select": {"count": 3}}, r"select.count: .* from 1 to 2 \(the model's blocks\); got 3"),
    ]:
        data = json.loads(json.dumps(base))
        for section, values in change.items():
            data[section].update(values)
        with pytest.raises(ConvHeadsError, match=match):
            preflight.check(validate(data))


def test_a_checkpoint_with_another_classifier_fine_tunes_from_its_body(tmp_path):
    from convheads import create_model
    cfg = validate(tiny_params(tmp_path))
    donor = create_model(cfg.model.name, **{**cfg.model.kwargs, "num_classes": 1000})
    torch.save(donor.state_dict(), tmp_path / "donor.pt")
    model_section = {**cfg.model.model_dump(), "checkpoint": str(tmp_path / "donor.pt")}
    cfg = validate({**tiny_params(tmp_path), "model": model_section})
    preflight.check(cfg)
    model = create_model(cfg.model.name, checkpoint=cfg.model.checkpoint, **{**cfg.model.kwargs, "num_classes": 10})
    assert torch.equal(model.blocks[1].attn.qkv.weight, donor.blocks[1].attn.qkv.weight)
    assert model.head.weight.shape == (10, 32)


def test_configuration_errors_name_the_key():
    for overrides, match in [
        (["recover.epoch=3"], "recover.epoch: unknown key"),
        (["recover.epochs=three"], "recover.epochs: Input should be a valid integer"),
        (["recover.lr=0"], "recover.lr: must be > 0; got 0.0"),
        (["select.granularity=layer"], "select.granularity: Input should be 'head' or 'block'"),
        (["data.source=folder"], "data.source=folder needs data.path"),
        (["replace.kernel_size=4"], "replace.kernel_size: must be a positive odd integer"),
        (["recover.epochs"], "is not key=value"),
        (["benchmark.runtimes=[eager, eager]"], "lists a runtime twice"),
        (["benchmark.runtimes=[tensorrt]"], "benchmark.runtimes.0: Input should be 'onnxruntime', 'onnxruntime-int8'"),
    ]:
        with pytest.raises(ConvHeadsError, match=match):
            load_config(None, overrides)


def test_overrides_apply_on_top_of_the_file(tmp_path):
    (tmp_path / "p.yaml").write_text("model:\n  name: vit_small_patch16_224\n  kwargs: {img_size: 64}\n")
    cfg = load_config(tmp_path / "p.yaml", ["model.kwargs.patch_size=8", "select.blocks=[0, 2]"])
    assert cfg.model.kwargs == {"img_size": 64, "patch_size": 8}  # the file's kwargs replace the defaults
    assert cfg.select.blocks == [0, 2] and cfg.recover.epochs == PipelineConfig().recover.epochs
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConvHeadsError, match="bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_the_shipped_params_file_is_generated_from_the_schema(tmp_path):
    shipped = PROJECT / "params.yaml"
    assert load_config(shipped) == PipelineConfig()
    check_params_file(shipped)  # what `make lint` checks in CI
    stale = tmp_path / "params.yaml"
    stale.write_text(shipped.read_text().replace("  repeats: 20\n", "  repeats: 5\n"))
    with pytest.raises(ConvHeadsError, match=r"(?s)regenerate it with `python -m pipeline params > .*params.yaml`"
                                             r".*-  repeats: 5.*\+  repeats: 20"):
        check_params_file(stale)


def test_the_presets_validate_and_a_missing_configuration_file_is_named(tmp_path):
    photos = load_config(PROJECT / "presets" / "photos.yaml")
    assert photos.data.source == "photos" and Path(photos.model.checkpoint).name == "photos_vit.pt"
    assert (PROJECT / photos.model.checkpoint).is_file()
    segmentation = load_config(PROJECT / "presets" / "segmentation.yaml")
    assert segmentation.task == "segmentation" and segmentation.model.checkpoint == photos.model.checkpoint
    assert segmentation.model_kwargs == {"img_size": segmentation.segmentation.image_size}  # the backbone's own shape
    digits = load_config(PROJECT / "presets" / "digits.yaml")
    assert digits.data.source == "digits" and digits.model.checkpoint is None
    with pytest.raises(ConvHeadsError, match="photo.yaml does not exist"):
        load_config(str(tmp_path / "photo.yaml"))


def test_task_dependent_training_settings_are_filled_in_per_task_and_old_keys_name_the_new_ones(tmp_path):
    for task in TASK_DEFAULTS:  # null (or left out) in a params file: the task's own
        cfg = load_config(PROJECT / "params.yaml", [f"task={task}"] if task == "segmentation" else [])
        for stage, values in TASK_DEFAULTS[task].items():
            assert {k: getattr(getattr(cfg, stage), k) for k in values} == values
    assert load_config(None, ["recover.epochs=7"]).recover.epochs == 7  # a value given wins
    for old in ("max_top1_drop", "max_miou_drop"):
        with pytest.raises(ConvHeadsError, match=f"registry.{old} is now registry.max_drop"):
            load_config(None, [f"registry.{old}=0.01"])
    shim = subprocess.run([sys.executable, "-m", "tasks", "run", "baseline"], cwd=PROJECT, capture_output=True,
                          text=True, timeout=60)
    assert shim.returncode == 2
    assert shim.stderr.strip() == ("error: `python -m tasks` is now `python -m pipeline`: "
                                   "run `python -m pipeline run baseline`")


def test_the_ensemble_variant_replaces_whole_blocks_and_ships_folded(finished_pipeline):
    from convheads import EnsembleHeadAttention
    params = tiny_params(finished_pipeline)
    with pytest.raises(ConvHeadsError, match="replace.variant=ensemble merges whole blocks"):
        validate({**params, "replace": {"variant": "ensemble"}, "select": {"granularity": "head"}})
    cfg = validate({**params, "replace": {"variant": "ensemble"}, "select": {"granularity": "block", "count": 1}})
    ran = [n for n, o in run_all(cfg).items() if not o.skipped]
    assert ran == ["select", "replace", "recover", "evaluate", "benchmark"]
    layers = [m for m in load_model(f"{cfg.paths.outputs}/recover/model.pt").modules()
              if isinstance(m, EnsembleHeadAttention)]
    assert len(layers) == 1 and layers[0].folded
    bench = read_record(cfg, "benchmark")["summary"]
    assert bench["compressed_params"] < bench["baseline_params"]


def test_the_closing_summary_reports_what_the_stages_measured(finished_pipeline):
    from pipeline.summary import summary
    from pipeline.summary import summary_table as table
    cfg = validate(tiny_params(finished_pipeline))
    s = summary(cfg)
    metrics = json.loads(open(f"{cfg.paths.outputs}/evaluate/metrics.json").read())
    selection = json.loads(open(f"{cfg.paths.outputs}/select/selection.json").read())
    assert s["compressed_top1"] == metrics["compressed"]["top1"] and s["top1_drop"] == metrics["top1_drop"]
    assert (s["heads_replaced"], s["heads_total"]) == (4, 8)
    assert s["whole_blocks"] == [int(b) for b in selection["heads"]]
    text = table(s)
    assert f"{metrics['compressed']['top1']:.2%}" in text and "4 of 8" in text
    assert f"whole blocks {s['whole_blocks'][0]}" in text and f"{s['speedup_b4']:.3f}x (onnxruntime)" in text
    assert "speedup in eager" in text and f"batch 1: {s['eager_speedup_b1']:.3f}x, batch 4: " in text
    scores = pd.read_csv(f"{cfg.paths.outputs}/score/scores.csv")
    assert s["local_heads"] == (scores.local_share >= 0.5).sum() and 0 < s["uniform_share"] < s["local_share_max"]
    assert f"{s['local_heads']} of 8" in text and f"most local {s['local_share_max']:.0%}" in text


def test_int8_deployment_is_benchmarked_and_evaluated_only_when_configured(finished_pipeline):
    cfg = validate(tiny_params(finished_pipeline))
    out = cfg.paths.outputs
    assert "compressed_int8" not in read_record(cfg, "evaluate")["summary"]   # default runtimes: no INT8
    assert pd.read_csv(f"{out}/benchmark/benchmark.csv").quantization.isna().all()
    int8 = with_changes(cfg, benchmark={"runtimes": ["onnxruntime-int8", "onnxruntime"]})
    ran = [n for n, o in run_all(int8).items() if not o.skipped]
    assert ran == ["evaluate", "benchmark"]   # of the benchmark section, only the runtimes reach evaluate

    bench = pd.read_csv(f"{out}/benchmark/benchmark.csv")
    quantized = bench[bench.runtime == "onnxruntime-int8"]
    assert len(quantized) == 4 and (quantized.infer_step_time > 0).all()   # 2 models x batch 1, 4
    assert set(quantized.quantization) == {"static"} and bench[bench.runtime == "onnxruntime"].quantization.isna().all()
    summary = read_record(int8, "benchmark")["summary"]
    assert summary["runtime"] == "onnxruntime-int8" and summary["speedup_b4"] == summary["onnxruntime-int8_speedup_b4"]
    assert summary["int8_quantization"] == {f"{m}_b{b}": "static" for b in (1, 4) for m in ("baseline", "compressed")}

    metrics = read_record(int8, "evaluate")["summary"]
    fp32, q = metrics["compressed"]["top1"], metrics["compressed_int8"]["top1"]
    assert metrics["int8_quantization"] == "static" and metrics["top1_int8_drop"] == pytest.approx(fp32 - q)
    # The tiny model's logits are close together, so INT8 rounding could flip its choice on any image:
    # it must still agree with float32 on nearly every test image (measured: 269 of 270), and top-1 stays
    # within 3 points (8 of 270 images).
    predictions = pd.read_csv(f"{out}/evaluate/predictions.csv")
    assert (predictions.compressed_int8 == predictions.compressed).mean() >= 0.95
    assert abs(q - fp32) <= 0.03
    assert list(pd.read_csv(f"{out}/evaluate/metrics.csv").model) == ["baseline", "replaced", "compressed",
                                                                      "compressed_int8"]


def test_selection_by_fit_and_the_global_variant_run_as_stages(finished_pipeline):
    cfg = with_changes(validate(tiny_params(finished_pipeline)), select={"method": "sigma_fit", "granularity": "head"},
                       replace={"variant": "depthwise_global"})
    for name in ("select", "replace"):
        assert not execute(STAGES[name], cfg).skipped
    out = cfg.paths.outputs
    heads = pd.read_csv(f"{out}/select/heads.csv")
    assert list(heads.columns) == ["block", "head", "sigma_h", "sigma_b", "fit", "fit_b", "selected"]
    assert heads.fit.between(0, 1).all() and heads.selected.sum() == 4
    assert read_record(cfg, "select")["summary"]["method"] == "sigma_fit"
    model = load_model(f"{out}/replace/model.pt")
    assert {b.attn.variant for b in model.blocks if hasattr(b.attn, "variant")} == {"depthwise_global"}
    with pytest.raises(ConvHeadsError, match="select.method"):
        load_config(None, ["select.method=magic"])
