"""Training, evaluation, data and timing helpers."""
import numpy as np
import pytest
import torch
from torch import nn

from convheads import ConvHeadsError, Selection, replace_heads
from benchmarks.timing import latency_stats, percentile, time_models
from convheads.data import ManifestDataset, digits_images, split_indices, write_split_folders
from convheads.manifest import build_manifest, scan_folder
from convheads.evaluation import evaluate
from convheads.training import new_parameters, train
from conftest import tiny_vit


def fake_loader(n=16, classes=5, batch=8):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[: len(x)]


def test_evaluate_counts_top1_top5_and_mean_loss():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 0, 5])  # top-1 hit; in top-5? no (rank 6); rank 6 again
    out = evaluate(FixedLogits(logits), [(torch.zeros(3, 1), labels)], progress=False)
    assert out["top1"] == pytest.approx(1 / 3) and out["top5"] == pytest.approx(1 / 3)
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert out["loss"] == pytest.approx(expected) and out["num_images"] == 3
    with pytest.raises(ConvHeadsError, match="no images"):
        evaluate(FixedLogits(logits), [], progress=False)


def test_training_lowers_the_loss_and_reports_each_epoch():
    model = tiny_vit()
    loader = fake_loader()
    before = evaluate(model, loader, progress=False)["loss"]
    seen = []
    history = train(model, loader, loader, epochs=3, lr=3e-3, warmup_epochs=0, progress=False, on_epoch=seen.append)
    assert [h["epoch"] for h in history] == [1, 2, 3] and seen == history
    assert history[-1]["val_loss"] < before
    assert set(history[0]) >= {"train_loss", "train_top1", "lr", "val_top1", "val_top5", "val_loss"}
    assert not model.training


def test_training_only_the_new_parameters_leaves_the_rest_untouched():
    model = replace_heads(tiny_vit(), Selection({1: [0, 2]}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = {id(p) for p in new_parameters(model)}
    assert len(new) == 3  # kernels, alpha, beta
    train(model, fake_loader(), epochs=1, lr=1e-2, trainable="new", progress=False)
    names = {id(p): n for n, p in model.named_parameters()}
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == {names[i] for i in new}
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_training_argument_errors():
    with pytest.raises(ConvHeadsError, match="no replaced depthwise heads"):
        train(tiny_vit(), fake_loader(), trainable="new", progress=False)
    with pytest.raises(ConvHeadsError, match="trainable must be one of"):
        train(tiny_vit(), fake_loader(), trainable="some", progress=False)


def test_digits_render_to_rgb_and_split_reproducibly(tmp_path):
    images, labels = digits_images(16)
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 2]).all() and images.max() == 255
    a = split_indices(labels, 0.15, 0.15, seed=3)
    b = split_indices(labels, 0.15, 0.15, seed=3)
    assert all((a[k] == b[k]).all() for k in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(1797))
    assert len(a["test"]) == 270 and len(a["val"]) == 270
    assert np.bincount(labels[a["test"]]).min() >= 26  # stratified: ~27 of each digit
    one_each = {k: np.array([v[labels[v] == c][0] for c in range(10)]) for k, v in a.items()}
    write_split_folders(tmp_path / "digits", images, labels, [str(i) for i in range(10)], one_each)
    stats = build_manifest(scan_folder(tmp_path / "digits"), tmp_path / "m.csv", tmp_path / "cache.db", progress=False)
    assert stats.counts == {"train": 10, "val": 10, "test": 10} and stats.modes == {"RGB": 30}
    ds = ManifestDataset(tmp_path / "m.csv", tmp_path / "digits", "test")
    assert len(ds) == 10 and ds[0][0].shape == (3, 16, 16) and [ds[i][1] for i in range(10)] == list(range(10))


def test_timing_interleaves_models_and_reports_timm_fields():
    calls = []

    class Probe(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    times = time_models({"a": Probe("a"), "b": Probe("b")}, torch.zeros(2), warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4 and [len(t) for t in times.values()] == [3, 3]
    stats = latency_stats([0.1, 0.2, 0.3, 0.4], batch_size=8)
    assert stats["infer_step_time"] == pytest.approx(250.0)
    assert stats["infer_step_time_p90"] == pytest.approx(370.0)
    assert stats["infer_samples_per_sec"] == pytest.approx(32.0)
    assert percentile([1, 2, 3], 50) == 2
    with pytest.raises(ConvHeadsError, match="repeats must be >= 1"):
        time_models({"a": Probe("a")}, torch.zeros(1), repeats=0)
