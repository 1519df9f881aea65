"""Stage evaluate: the task's metrics for the baseline, replaced and recovered models on the test split
(classification: top-1/top-5/loss, and every test image's prediction by each model for paired
comparisons; segmentation: mIoU, pixel accuracy, loss, per-class IoU and a panel of predictions).

With onnxruntime-int8 among benchmark.runtimes, also the recovered model as deployed in INT8
(`compressed_int8`: its ONNX export quantized as the benchmark stage quantizes it, calibrated on
training images, run in onnxruntime), and its drop vs the float32 model."""
import tempfile
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no GUI backend on servers and workers
from matplotlib.patches import Patch

from convheads.export import OnnxModel
from convheads.quantize import export_int8
from convheads.segmentation import IGNORE_INDEX

from ..artifacts import INT8_MODEL, MODELS, read_meta, stage_model
from ..config import PipelineConfig
from ..loaders import calibration_batches, loader
from ..problems import data_config, problem
from ..runner import Stage, write_json

METRICS, TABLE, PREDICTIONS = "metrics.json", "metrics.csv", "predictions.csv"
PER_CLASS, PANEL = "per_class_iou.csv", "predictions.png"
PANEL_IMAGES = 6
INT8_BATCH = 64  # the INT8 export's batch size (its shapes are static): test batches run in chunks of it


def run(cfg: PipelineConfig, out: Path) -> Dict:
    task = problem(cfg)
    results, per_class, models, predicted = {}, {}, {}, {}
    per_image = cfg.task == "classification"
    for name, stage in MODELS.items():
        models[name] = stage_model(cfg, stage)
        metrics = task.evaluate(models[name], loader(cfg, models[name], "test", cfg.evaluate.batch_size),
                                per_image=per_image)
        results[name] = {k: metrics[k] for k in task.metrics}
        per_class[name] = metrics.get("iou")
        if per_image:
            predicted["label"], predicted[name] = metrics["labels"].numpy(), metrics["predicted"].numpy()
    results[f"{task.headline}_drop"] = results["baseline"][task.headline] - results["compressed"][task.headline]
    names = list(MODELS)
    if cfg.int8:
        with tempfile.TemporaryDirectory() as tmp:
            quantized = export_int8(models["compressed"], Path(tmp) / "int8.onnx",
                                    calibration_batches(cfg, models["compressed"], INT8_BATCH), INT8_BATCH)
            metrics = task.evaluate(in_chunks(OnnxModel(quantized.path)),
                                    loader(cfg, models["compressed"], "test", cfg.evaluate.batch_size),
                                    device="cpu", precision="fp32", per_image=per_image)
        names.append(INT8_MODEL)
        results[INT8_MODEL] = {k: metrics[k] for k in task.metrics}
        per_class[INT8_MODEL] = metrics.get("iou")
        if per_image:
            predicted[INT8_MODEL] = metrics["predicted"].numpy()
        headline = task.headline
        results[f"{headline}_int8_drop"] = results["compressed"][headline] - results[INT8_MODEL][headline]
        results["int8_quantization"] = quantized.method
        if quantized.fallback:
            results["int8_fallback"] = quantized.fallback
    results["num_images"] = metrics["num_images"]
    write_json(out / METRICS, results)
    pd.DataFrame([{"model": n, **results[n]} for n in names]).to_csv(out / TABLE, index=False)
    if per_image:  # test images in the manifest's order: the same rows in every run on this data version
        pd.DataFrame(predicted).to_csv(out / PREDICTIONS, index_label="image")
    if cfg.task == "segmentation":
        classes = read_meta(cfg)["classes"]
        pd.DataFrame({"class": classes, **{f"{n}_iou": per_class[n] for n in names}}).to_csv(
            out / PER_CLASS, index=False, float_format="%.6f")
        plot_predictions(cfg, models["baseline"], models["compressed"], classes, out / PANEL)
    return results


def in_chunks(run: OnnxModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """An export with a static batch size, on batches of any size: run in chunks of its size, the
    last one padded with zeros (and their outputs dropped)."""
    size = run.input.shape[0]

    def call(images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in images.split(size):
            padded = torch.cat([chunk, chunk.new_zeros(size - len(chunk), *chunk.shape[1:])])
            outputs.append(run(padded)[:len(chunk)])
        return torch.cat(outputs)

    return call


def palette(num_classes: int) -> np.ndarray:
    """[num_classes + 1, 3] fixed colours in [0, 1]: class 0 black, then tab20's (its dark shades
    first), cycled; the last row (ignore_index) light grey."""
    tab = colormaps["tab20"].colors
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    colours = [(0.0, 0.0, 0.0)] + [tab[order[i % 20]] for i in range(num_classes - 1)]
    return np.array(colours + [(0.85, 0.85, 0.85)])


@torch.no_grad()
def plot_predictions(cfg: PipelineConfig, baseline, compressed, classes, path: Path) -> None:
    """The first test images: image | ground truth | baseline | compressed, one row each, with a legend."""
    dataset = problem(cfg).dataset(baseline, "test", augment="none")
    images, masks = (torch.stack(t) for t in zip(*(dataset[i] for i in range(min(PANEL_IMAGES, len(dataset))))))
    dc = data_config(cfg, baseline)
    shown = (images * torch.tensor(dc["std"])[:, None, None] + torch.tensor(dc["mean"])[:, None, None]).clamp(0, 1)
    colours = palette(len(classes))
    ignore = len(colours) - 1

    def coloured(labels: torch.Tensor) -> np.ndarray:
        labels = labels.clone()
        labels[labels == IGNORE_INDEX] = ignore
        return colours[labels.numpy()]

    columns = {"image": None, "ground truth": masks, "baseline": baseline.eval()(images).argmax(1),
               "compressed": compressed.eval()(images).argmax(1)}
    fig = Figure(figsize=(2 * len(columns) + 2, 2 * len(images)), layout="constrained")
    axes = fig.subplots(len(images), len(columns), squeeze=False)
    for row in range(len(images)):
        for col, (title, labels) in enumerate(columns.items()):
            ax = axes[row, col]
            ax.imshow(shown[row].permute(1, 2, 0).numpy() if labels is None else coloured(labels[row]),
                      interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(classes)]
    handles.append(Patch(color=colours[ignore], label=f"ignored ({IGNORE_INDEX})"))
    fig.legend(handles=handles, loc="outside right center", fontsize="small")
    fig.savefig(path, dpi=80)


# benchmark.runtimes says whether the INT8 model is evaluated: that alone of the benchmark section reruns this stage
STAGE = Stage("evaluate", run, ("segmentation", "evaluate", "device", "precision"),
              needs=("baseline", "replace", "recover"), watch=lambda cfg: {"int8": cfg.int8})
