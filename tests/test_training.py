"""Training, evaluation, data and timing helpers."""
import numpy as np
import pytest
import torch
from helpers import replaced_tiny, tiny_vit
from torch import nn

from convheads import ConvHeadsError, Selection, replace_heads
from convheads.data.images import digits_images, split_indices, write_split_folders
from convheads.data.loaders import ManifestDataset
from convheads.data.manifest import build_manifest, scan_folder
from convheads.engine.evaluation import evaluate
from convheads.engine.timing import latency_stats, percentile, time_models
from convheads.engine.training import TrainSettings, new_parameters, param_groups, train


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
    history = train(model, loader, TrainSettings(epochs=3, lr=3e-3, warmup_epochs=0), loader, progress=False,
                    on_epoch=seen.append)
    assert [h["epoch"] for h in history] == [1, 2, 3] and seen == history
    assert history[-1]["val_loss"] < before
    assert set(history[0]) >= {"train_loss", "train_top1", "lr", "val_top1", "val_top5", "val_loss"}
    assert not model.training


def test_training_only_the_new_parameters_leaves_the_rest_untouched():
    model = replace_heads(tiny_vit(), Selection({1: [0, 2]}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = {id(p) for p in new_parameters(model)}
    assert len(new) == 3  # kernels, alpha, beta
    train(model, fake_loader(), TrainSettings(epochs=1, lr=1e-2, trainable="new"), progress=False)
    names = {id(p): n for n, p in model.named_parameters()}
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == {names[i] for i in new}
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_weight_decay_spares_tokens_position_embedding_1d_and_the_new_parameters():
    model = replaced_tiny()  # a CLS token and 2 register tokens, depthwise heads and an ensemble block
    names = {id(p): n for n, p in model.named_parameters()}
    new = {names[id(p)] for p in new_parameters(model)}
    for layer_decay in (None, 0.75):
        groups = param_groups(model, 0.05, layer_decay)
        decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        spared = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        assert {"pos_embed", "cls_token", "reg_token"} | new <= spared
        assert "blocks.2.attn.qkv.weight" in decayed and "blocks.0.norm1.weight" in spared
        assert decayed | spared == set(names.values()) and not decayed & spared
    scales = {g["lr_scale"] for g in param_groups(model, 0.05, 0.5)}
    assert max(scales) == 1.0 and min(scales) == 0.5 ** 5  # the head at 1, the embeddings 5 layers down


def test_accumulation_and_checkpointing_train_the_same_weights():
    x, y = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 5
    trained = {}
    for name, batch, options in [("plain", 8, {}), ("accumulated", 4, {"accumulation": 2}),
                                 ("checkpointed", 8, {"grad_checkpointing": True})]:
        torch.manual_seed(0)
        model = tiny_vit()
        train(model, [(x[i:i + batch], y[i:i + batch]) for i in range(0, 16, batch)],
              TrainSettings(epochs=2, lr=3e-3, warmup_epochs=0, **options), progress=False)
        trained[name] = model.state_dict()
        assert not model.grad_checkpointing
    for name in ("accumulated", "checkpointed"):
        assert all(torch.allclose(trained[name][k], v, atol=1e-4) for k, v in trained["plain"].items()), name


def test_bf16_autocast_trains_evaluates_and_scores_on_the_cpu():
    model, loader = tiny_vit(), fake_loader()
    history = train(model, loader, TrainSettings(epochs=3, lr=3e-3, warmup_epochs=0), loader, progress=False,
                    precision="bf16")
    assert history[-1]["train_loss"] < history[0]["train_loss"] and np.isfinite(history[-1]["val_loss"])
    fp32, bf16 = (evaluate(model, loader, progress=False, precision=p) for p in ("fp32", "bf16"))
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05) and bf16["num_images"] == 16
    from convheads import score_heads

    images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))]
    exact, low = (score_heads(model, images, progress=False, precision=p) for p in ("fp32", "bf16"))
    assert low.sigma_h.dtype == torch.float64
    assert torch.allclose(low.sigma_h, exact.sigma_h, rtol=0.1)
    half = tiny_vit().half()  # a model cast to half precision takes its inputs cast to match
    assert evaluate(half, loader, progress=False)["num_images"] == 16
    with pytest.raises(ConvHeadsError, match="fp16 needs a CUDA GPU"):
        train(tiny_vit(), loader, progress=False, precision="fp16")


def test_a_resumed_run_with_ema_equals_an_uninterrupted_one(tmp_path):
    loader = fake_loader()
    options = dict(settings=TrainSettings(epochs=3, lr=3e-3, warmup_epochs=1, ema_decay=0.9, clip_grad=1.0),
                   progress=False)
    torch.manual_seed(0)
    whole = tiny_vit()
    train(whole, loader, val_loader=loader, **options)

    class Interrupted(Exception):
        pass

    def interrupt(row):
        raise Interrupted

    torch.manual_seed(0)
    with pytest.raises(Interrupted):  # after the first epoch and its checkpoint
        train(tiny_vit(), loader, val_loader=loader, **options, checkpoint=tmp_path / "resume.pt", on_epoch=interrupt)
    torch.manual_seed(5)
    resumed = tiny_vit()
    history = train(resumed, loader, val_loader=loader, **options, checkpoint=tmp_path / "resume.pt")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(torch.allclose(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())
    # a checkpoint of another global batch (other batch sizes, or another number of processes) is refused
    with pytest.raises(ConvHeadsError, match="was written with 2 updates per epoch, this run has 4"):
        train(tiny_vit(), fake_loader(batch=4), **options, checkpoint=tmp_path / "resume.pt")


def test_training_argument_errors():
    with pytest.raises(ConvHeadsError, match="no replaced depthwise heads"):
        train(tiny_vit(), fake_loader(), TrainSettings(trainable="new"), progress=False)
    with pytest.raises(ConvHeadsError, match="trainable must be one of"):
        TrainSettings(trainable="some")
    with pytest.raises(ConvHeadsError, match="epochs must be >= 0; got -1"):
        TrainSettings(epochs=-1)
    with pytest.raises(ConvHeadsError, match="settings must be a convheads TrainSettings"):
        train(tiny_vit(), fake_loader(), settings={"epochs": 1}, progress=False)


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
