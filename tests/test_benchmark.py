"""Replaced models under torch.compile and channels_last; the benchmark suite's rows and errors.

The compile test uses the aot_eager backend: dynamo and AOTAutograd trace the whole model
(fullgraph=True fails on any graph break) without inductor's C++ code generation, which alone
takes 13-20 s for a tiny model on a cold cache on 2 CPU cores. The suite's `modes` section checks
inductor's outputs against eager at the real settings.
"""
import os

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import replaced_tiny, tiny_vit

from benchmarks import layer_speed, suite
from benchmarks.measure import (
    Setting,
    benchmark_setting,
    compare_int8,
    compare_modes,
    compare_onnx,
    ratio_interval,
    sweep_blocks,
)
from benchmarks.results import read_stamp
from convheads import ConvHeadsError, Selection, export_onnx, replace_heads
from convheads.engine.timing import OnnxTimer, time_in_runtime, time_models
from convheads.export import OnnxModel


def test_torch_compile_traces_every_replaced_layer_in_one_graph_with_the_same_outputs():
    model = replaced_tiny()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    model.train()
    compiled(x).sum().backward()  # training through the compiled graph reaches the new parameters
    assert model.blocks[3].attn.logits.grad.abs().sum() > 0
    assert model.blocks[0].attn.mixer.conv.weight.grad.abs().sum() > 0


def test_channels_last_weights_and_inputs_give_the_same_outputs():
    model = replaced_tiny()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model.to(memory_format=torch.channels_last)
    assert model.blocks[0].attn.mixer.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected,
                               atol=1e-6, rtol=1e-5)


def test_a_setting_gives_one_row_per_batch_size_and_variant_with_exact_cost_ratios():
    rows = benchmark_setting(Setting("vit_tiny_patch16_224", 64, 6), batch_sizes=(1, 2), repeats=1, warmup=0)
    assert [(r["batch_size"], r["variant"]) for r in rows] == [(b, v) for b in (1, 2) for v in (
        "original", "depthwise", "depthwise_global", "identity", "ensemble", "folded")]
    by = {r["variant"]: r for r in rows[:6]}
    assert by["original"]["speedup"] == 1.0 and by["original"]["macs_ratio"] == 1.0
    # every variant removes more work than the one before it
    assert 1 < by["depthwise"]["macs_ratio"] < by["identity"]["macs_ratio"] < by["ensemble"]["macs_ratio"]
    assert by["original"]["params"] > by["depthwise"]["params"] > by["identity"]["params"] > by["ensemble"]["params"]
    # one kernel per block folded into W_O diag(a) W_V: a little more than identity, far less than depthwise
    assert by["depthwise"]["macs_ratio"] < by["folded"]["macs_ratio"] < by["identity"]["macs_ratio"]
    # the global term: the same MACs, gamma and phi (1 + 1 prefix token^2) per head of the 6 blocks' 3 heads
    assert by["depthwise_global"]["macs_ratio"] == by["depthwise"]["macs_ratio"]
    assert by["depthwise_global"]["params"] - by["depthwise"]["params"] == 6 * 3 * 2
    assert all(r["threads"] == torch.get_num_threads() and r["infer_step_time_p90"] >= r["infer_step_time"]
               for r in rows)


def test_the_sweep_replaces_one_more_block_per_step():
    rows = sweep_blocks("vit_tiny_patch16_224", 32, repeats=1, warmup=0)
    assert [r["blocks"] for r in rows] == list(range(13))
    ratios = [r["macs_ratio"] for r in rows]
    assert ratios[0] == 1.0 and all(a < b for a, b in zip(ratios, ratios[1:]))


def test_modes_check_outputs_against_eager():
    rows = compare_modes(Setting("vit_tiny_patch16_224", 32, 2), modes=("eager", "channels_last"), repeats=1,
                         warmup=0)
    assert [(r["variant"], r["mode"]) for r in rows] == [(v, m) for v in ("original", "depthwise")
                                                         for m in ("eager", "channels_last")]
    assert all(r["max_abs_diff"] < 1e-5 for r in rows)


@pytest.mark.parametrize("call, match", [
    (lambda: Setting.parse("vit_large_patch14_dinov2:336"), "MODEL:IMG_SIZE:BLOCKS"),
    (lambda: Setting("vit_large_patch14_dinov", 336, 12).check(), "unknown timm model .*did you mean"),
    (lambda: Setting("vit_tiny_patch16_224", 224, 13).check(), "has 12 blocks; replace 0 to 12"),
    (lambda: Setting("vit_tiny_patch16_224", 100, 1).check(), "not divisible by patch_size"),
    (lambda: Setting("resnet18", 224, 1).check(), "cannot build resnet18"),
    (lambda: Setting("vit_tiny_patch16_224", 32, 1).build(["nop"]), "unknown variants"),
    (lambda: time_models({"m": tiny_vit()}, torch.randn(1, 3, 32, 32), repeats=0), "repeats must be >= 1"),
    (lambda: benchmark_setting(Setting("vit_tiny_patch16_224", 32, 1), repeats=-1), "repeats must be >= 1"),
    (lambda: sweep_blocks("vit_tiny_patch16_224", 32, variant="original"), "variant must be one of"),
])
def test_bad_benchmark_arguments_get_clear_errors(call, match):
    with pytest.raises(ConvHeadsError, match=match):
        call()


@pytest.mark.parametrize("argv, match", [
    (["--settings", "vit_huge_patch99:224:1"], "unknown timm model 'vit_huge_patch99'"),
    (["--repeats", "0"], "repeats must be >= 1"),
    (["--sweep-repeats", "-2"], "repeats must be >= 1"),
    (["--batch-sizes", "0"], "batch-sizes must be >= 1"),
    (["--scoring-model", "vit_small_patch16_224"], "MODEL:IMG_SIZE"),
])
def test_the_suite_checks_its_arguments_before_running_anything(argv, match, tmp_path):
    with pytest.raises(ConvHeadsError, match=match):
        suite.run(suite.parse_args(["--quick", "--out", str(tmp_path)] + argv))
    assert not list(tmp_path.iterdir())


def test_the_suite_writes_tables_and_the_sweep_plot(tmp_path):
    tables = suite.run(suite.parse_args(["--quick", "--settings", "vit_tiny_patch16_224:32:2", "--sections",
                                         "latency", "sweep", "--out", str(tmp_path)]))
    assert set(tables) == {"latency", "sweep"}
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"suite_latency.csv", "suite_latency.json", "suite_sweep.csv", "suite_sweep.json", "sweep.png"}
    assert len(pd.read_csv(tmp_path / "suite_latency.csv")) == 2 * 6  # quick: batch sizes 1, 2; 6 variants
    stamp = read_stamp(tmp_path / "suite_latency.csv")  # what measured it, for the docs' speed page
    assert stamp["page"] == "speed" and stamp["machine"]["cores"] >= 1 and "benchmarks" not in stamp["title"]
    assert set(stamp["columns"]) <= set(pd.read_csv(tmp_path / "suite_latency.csv").columns)
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_onnx_sessions_are_timed_in_a_process_of_their_own_with_torchs_threads_and_no_spinning():
    """Interleaved in one process, onnxruntime's and PyTorch's busy-waiting threads slow each other
    (PyTorch eager 121 ms instead of 75 ms on 2 cores), so each runtime is timed on its own."""
    rows = compare_onnx(Setting("vit_tiny_patch16_224", 32, 2), variants=("original", "depthwise"), repeats=1,
                        warmup=0)
    assert [(r["variant"], r["runtime"]) for r in rows] == [(v, r) for v in ("original", "depthwise")
                                                            for r in ("pytorch", "onnxruntime")]
    for r in rows:
        assert (r["pid"] == os.getpid()) == (r["runtime"] == "pytorch")
        assert r["onnx_max_abs_diff"] < 1e-4 and r["threads"] == torch.get_num_threads()
        if r["runtime"] == "onnxruntime":
            assert r["intra_op_threads"] == torch.get_num_threads() and r["spinning"] == "0"


def test_onnx_runner_spins_only_when_asked(tmp_path):
    path = export_onnx(tiny_vit(), tmp_path / "m.onnx")
    for spinning, entry in ((False, "0"), (True, "1")):
        options = OnnxModel(path, threads=1, spinning=spinning).session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry
        assert options.intra_op_num_threads == 1


def test_int8_timing_quantizes_each_model_on_the_calibration_images_and_says_how(tmp_path):
    replaced = tiny_vit(depth=2)
    replace_heads(replaced, Selection.from_blocks([0], 4))
    models, x = {"original": tiny_vit(depth=2), "replaced": replaced}, torch.randn(2, 3, 32, 32)
    with pytest.raises(ConvHeadsError, match="calibration=<a few batches of training images>"):
        time_in_runtime(models, "onnxruntime-int8", x, tmp_path, onnx=None)
    quantized = {}
    with OnnxTimer() as onnx:
        times = time_in_runtime(models, "onnxruntime-int8", x, tmp_path, onnx, warmup=0, repeats=2,
                                calibration=[torch.randn(3, 3, 32, 32) for _ in range(2)], quantized=quantized)
    assert {name: len(t) for name, t in times.items()} == {"original": 2, "replaced": 2}
    assert {name: (q.method, q.fallback) for name, q in quantized.items()} == {"original": ("static", None),
                                                                             "replaced": ("static", None)}
    assert all(q.path == tmp_path / f"{name}_b2_int8.onnx" for name, q in quantized.items())


def test_the_layer_benchmark_times_each_runtime_and_draws_the_ratios(tmp_path):
    pts = layer_speed.points(grids=[4, 6], widths=[128], prefixes=[1], batches=[1],
                             variants=["depthwise", "depthwise_global"], depth=2)
    original, replaced = pts[0].build()   # a chain of distinct layers, so that one evicts the other from the cache
    assert len(original) == len(replaced) == 2
    assert not torch.equal(original[0].qkv.weight, original[1].qkv.weight)
    assert not torch.equal(replaced[0].mixer.alpha, replaced[1].mixer.alpha)
    rows = layer_speed.layer_speed(pts, ("eager", "onnxruntime"), budget_s=0.01, min_rounds=2)
    assert [(r["grid"], r["variant"], r["runtime"], r["depth"]) for r in rows] == [
        (g, v, r, 2) for g in (4, 6) for v in ("depthwise", "depthwise_global") for r in ("eager", "onnxruntime")]
    assert [r["mixing"] for r in rows] == ["banded", "conv"] * 4
    assert all(r["tokens"] == 1 + r["grid"] ** 2 and r["rounds"] >= 2 for r in rows)
    assert all(r["ratio"] == pytest.approx(r["replaced_us"] / r["original_us"]) for r in rows)
    layer_speed.plot_layers(rows, tmp_path / "layers.png")
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConvHeadsError, match="widths in"):
        layer_speed.points(widths=[100])
    with pytest.raises(ConvHeadsError, match="layer variants"):
        layer_speed.points(variants=["fixed"])
    with pytest.raises(ConvHeadsError, match="depth 0"):
        layer_speed.points(depth=0)


def test_the_digits_setting_is_the_pipelines_default_vit():
    models = Setting.parse("digits:32:2").build(["original", "depthwise_global"])
    assert models["original"].patch_embed.grid_size == (8, 8) and len(models["original"].blocks) == 6
    assert models["depthwise_global"].blocks[1].attn.variant == "depthwise_global"
    with pytest.raises(ConvHeadsError, match="32 px"):
        Setting("digits", 64, 1).check()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_the_methods_comparison_tabulates_each_method_and_seed_in_the_tasks_metric(task, tmp_path):
    import yaml
    from helpers import seg_params, tiny_params

    from benchmarks import methods
    from pipeline.config import validate
    from pipeline.dag import STAGES
    from pipeline.runner import execute, output_dir

    params = seg_params(tmp_path) if task == "segmentation" else tiny_params(tmp_path)
    params["select"]["fraction"] = 0.5
    cfg = validate(params)
    for stage in ("data", "baseline", "score"):
        execute(STAGES[stage], cfg)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "methods"
    baseline = str(output_dir(cfg, "baseline") / "model.pt")
    methods.main(["--params", str(tmp_path / "params.yaml"), "--baseline", baseline,
                  "--scores", str(output_dir(cfg, "score") / "scores.pt"), "--methods", "attention", "fixed",
                  "--seeds", "0", "1", "--out", str(out), "--results", str(tmp_path / "results")])
    table = pd.read_csv(out / "methods.csv")
    assert len(table) == 1 + 2 * 2 * 2  # the baseline, then (method, seed) x (replaced, recovered)
    metric = "miou" if task == "segmentation" else "top1"
    assert table[metric].between(0, 1).all() and ("top1" in table.columns) == (task == "classification")
    if task == "classification":  # exact binomial intervals around top-1
        assert (table.ci_low <= table.top1).all() and (table.top1 <= table.ci_high).all()
    assert f"metric: {metric}" in (out / "summary.md").read_text() and not (out / "scores.pt").exists()
    name = "methods" if task == "classification" else "methods_segmentation"
    assert pd.read_csv(tmp_path / "results" / f"{name}.csv").equals(table)  # the stamped copy for the docs
    assert read_stamp(tmp_path / "results" / f"{name}.csv")["page"] == "methods"


def test_the_int8_section_times_every_variant_in_float32_and_int8_and_says_how_it_was_quantized():
    rows = compare_int8(Setting("vit_tiny_patch16_224", 64, 6), repeats=2, warmup=0, calibration_images=2)
    assert [(r["runtime"], r["variant"]) for r in rows] == [(rt, v) for rt in ("onnxruntime", "onnxruntime-int8")
                                                            for v in ("original", "depthwise", "identity", "folded")]
    int8 = [r for r in rows if r["runtime"] == "onnxruntime-int8"]
    assert all(r["quantization"] == "static" and r["int8_vs_fp32"] > 0 for r in int8)
    assert all(r["speedup_vs_original"] == 1.0 for r in rows if r["variant"] == "original")
    assert all(r["speedup_lo"] <= r["speedup_vs_original"] <= r["speedup_hi"] and
               r["vs_identity_lo"] <= r["vs_identity"] <= r["vs_identity_hi"] for r in rows)
    assert all(r["vs_identity"] == 1.0 for r in rows if r["variant"] == "identity")


def test_a_paired_interval_cancels_what_slowed_a_round_for_both_models():
    rounds = np.array([1.0, 3.0, 1.5, 9.0, 2.0, 1.1])  # a noisy machine: rounds differ by 9x
    assert ratio_interval(2 * rounds, rounds) == pytest.approx((2.0, 2.0))  # but one model is always twice the other
    low, high = ratio_interval(rounds, rounds[::-1])  # unpaired: the noise shows in the interval
    assert low < 1 < high and high / low > 2
    with pytest.raises(ConvHeadsError, match="same >= 2 rounds"):
        ratio_interval([1.0, 2.0], [1.0])
