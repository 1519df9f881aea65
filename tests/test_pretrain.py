"""The photo crops, masked image modelling, the pretrain stage and shipping its checkpoint."""
import json

import mlflow
import numpy as np
import pytest
import torch
from helpers import PROJECT, tiny_params, tiny_vit
from timm.layers import build_sincos2d_pos_embed

from convheads import ConvHeadsError, create_model, load_checkpoint
from convheads.data.photos import PhotoCrops, PhotoSettings, folder_photos, load_photos, split_tiles
from convheads.mim import MaskedImageModel, PretrainSettings, pretrain, random_masks
from flows.pretrain import SHIP_COMMAND
from flows.pretrain import pretrain as pretrain_flow
from pipeline.config import PHOTOS_CHECKPOINT, load_config, validate
from pipeline.dag import ALL_STAGES
from pipeline.runner import execute
from pipeline.stages.pretrain import pretrain_code, sha256, ship, shipped_settings


@pytest.fixture(scope="module")
def photos():
    return load_photos()


def test_the_splits_are_cut_from_disjoint_tiles(photos):
    settings = PhotoSettings(tile=64, crop=48)
    assert len(photos) == 18 and all(p.dtype == np.uint8 and p.shape[2] == 3 for p in photos.values())
    for c, photo in enumerate(photos.values()):
        tiles = split_tiles(photo.shape[:2], settings, c)
        owner = {}
        for split, corners in tiles.items():
            assert corners, split
            for corner in corners:
                assert corner not in owner
                owner[corner] = split
    crops = PhotoCrops(photos, settings, "test")
    image, label = crops.sample(7)
    assert image.shape == (32, 32, 3) and label == 7 % 18
    again, _ = PhotoCrops(photos, settings, "test").sample(7)
    assert np.array_equal(image, again)                                        # a pure function of the index
    assert not np.array_equal(image, PhotoCrops(photos, settings, "train").sample(7)[0])


def test_bad_crops_and_sources_fail_before_training(tmp_path, photos):
    with pytest.raises(ConvHeadsError, match="crop .80 px. must fit inside a tile .64 px"):
        PhotoSettings(tile=64, crop=80)
    with pytest.raises(ConvHeadsError, match="crops of up to 72 px do not fit in 64 px tiles"):
        PhotoCrops(photos, PhotoSettings(tile=64, crop=48), "train", scale=(0.5, 1.5))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ConvHeadsError, match="holds no images"):
        folder_photos(tmp_path / "empty")
    with pytest.raises(ConvHeadsError, match="has no 1024 px tile"):
        PhotoCrops(photos, PhotoSettings(tile=1024, crop=48), "test")
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(ConvHeadsError, match="mask_ratio must be in .0, 1."):
            PretrainSettings(mask_ratio=ratio)
    errors = {"pretrain.mask_ratio": {"pretrain": {"mask_ratio": 1.0}},
              "data.photos": {"data": {"photos": {"crop": 96}}},
              "pretrain.path": {"pretrain": {"source": "folder"}}}
    for key, data in errors.items():
        with pytest.raises(ConvHeadsError, match=key):
            validate(data)


def test_masks_hide_the_ratio_and_the_loss_counts_only_hidden_patches():
    masks = random_masks(4, 64, 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (4, 64) and (masks.sum(1) == 32).all() and not torch.equal(masks[0], masks[1])
    mim = MaskedImageModel(tiny_vit(num_classes=0))
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    loss = mim(images, mask)
    changed = images.clone()
    changed[:, :, 24:, 24:] = 0   # the last patch: shown, never predicted
    assert loss.item() > 0 and mim(changed, mask).item() != loss.item()  # it is seen through attention ...
    mim.decoder.weight.data.zero_(), mim.decoder.bias.data.zero_()
    target = images.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 192)
    assert mim(images, mask).item() == pytest.approx(target[:, :5].abs().mean().item(), rel=1e-5)  # ... not scored


def _batches(step):
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(step))


def test_a_killed_pretraining_resumes_to_the_same_weights(tmp_path):
    settings = PretrainSettings(steps=6, batch_size=8, warmup_steps=1, save_every=2)

    def vit():
        torch.manual_seed(0)
        return tiny_vit(num_classes=0)

    straight = vit()
    pretrain(straight, _batches, settings, progress=False)

    def dies_at_step_3(step):
        if step == 3:
            raise KeyboardInterrupt  # the process is killed after the checkpoint of step 2
        return _batches(step)

    with pytest.raises(KeyboardInterrupt):
        pretrain(vit(), dies_at_step_3, settings, checkpoint=tmp_path / "ck.pt", progress=False)
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["step"] == 2
    resumed = tiny_vit(num_classes=0)  # another init: the checkpoint's weights replace it
    history = pretrain(resumed, _batches, settings, checkpoint=tmp_path / "ck.pt", progress=False)
    assert [h["step"] for h in history] == [2, 4, 6]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ConvHeadsError, match="other pretraining settings"):
        pretrain(vit(), _batches, PretrainSettings(steps=6, batch_size=8, warmup_steps=1, save_every=2, lr=0.1),
                 checkpoint=tmp_path / "ck.pt", progress=False)


def test_the_sincos_position_is_fixed_while_pretraining_and_learned_after():
    torch.manual_seed(0)
    vit = tiny_vit(num_classes=0)
    pretrain(vit, _batches, PretrainSettings(steps=3, batch_size=8, warmup_steps=1, save_every=3), progress=False)
    h, w = vit.patch_embed.grid_size
    assert torch.equal(vit.pos_embed[0, -h * w:], build_sincos2d_pos_embed([h, w], dim=vit.embed_dim))
    assert not vit.pos_embed[0, :-h * w].any() and vit.pos_embed.requires_grad   # fine-tuning learns it
    learned = tiny_vit(num_classes=0)
    before = learned.pos_embed.detach().clone()
    pretrain(learned, _batches, PretrainSettings(steps=3, batch_size=8, warmup_steps=1, save_every=3,
                                                 position="learned"), progress=False)
    assert not torch.equal(learned.pos_embed, before)
    with pytest.raises(ConvHeadsError, match="position must be one of"):
        PretrainSettings(position="rope")


@pytest.mark.slow
def test_the_pretrain_stage_is_reproducible_and_its_backbone_fits_the_pipeline(tmp_path):
    params = tiny_params(tmp_path)
    params["pretrain"] = {"steps": 3, "batch_size": 8, "warmup_steps": 1, "save_every": 1,
                          "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4}}
    params["data"]["image_size"] = 16
    cfg = validate(params)
    first = execute(ALL_STAGES["pretrain"], cfg)
    again = execute(ALL_STAGES["pretrain"], cfg, force=True)
    assert first.summary["backbone_sha256"] == again.summary["backbone_sha256"]   # bit for bit
    shipped = ship(first.path, tmp_path / "shipped" / "vit.pt", {"code": pretrain_code(),
                                                                "settings": shipped_settings(cfg)})
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["sha256"] == sha256(shipped) == first.summary["backbone_sha256"]
    assert set(record["code"]) == {"convheads/mim.py", "convheads/data/photos.py", "pipeline/stages/pretrain.py"}
    assert {"local_heads", "uniform_share", "final_loss"} <= set(first.summary)
    assert (first.path / "locality.csv").is_file() and (first.path / "locality.png").is_file()
    model = create_model(cfg.model.name, checkpoint=first.path / "backbone.pt", num_classes=18)
    assert model.embed_dim == 32 and len(model.blocks) == 2
    wider = create_model(cfg.model.name, img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=4)
    with pytest.raises(ConvHeadsError, match="does not fit the model.*shape mismatches"):
        load_checkpoint(wider, first.path / "backbone.pt")


def test_the_shipped_backbone_is_what_the_pretraining_code_and_settings_produce():
    """The fingerprint beside the photo testbed's backbone holds the file's SHA-256 and what produced it:
    the pretraining's own code and settings. Changing either fails here until the backbone is shipped again."""
    shipped = PROJECT / PHOTOS_CHECKPOINT
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert sha256(shipped) == record["sha256"], f"{shipped} is not the file its fingerprint describes"
    assert record["code"] == pretrain_code(), f"the pretraining code changed since it was shipped: {SHIP_COMMAND}"
    photos = load_config(PROJECT / "presets" / "photos.yaml")
    settings = shipped_settings(photos)
    assert record["settings"] == json.loads(json.dumps(settings)), f"the pretraining settings changed: {SHIP_COMMAND}"
    assert record["command"] == SHIP_COMMAND
    model = create_model(photos.model.name, checkpoint=shipped, num_classes=18)
    assert len(model.blocks) == 6 and model.embed_dim == 128


@pytest.mark.slow  # a Prefect flow run and MLflow
def test_the_pretrain_flow_logs_to_mlflow_ships_and_skips_when_up_to_date(prefect_api, tmp_path):
    params = tiny_params(tmp_path)
    params["data"]["image_size"] = 16
    cfg = validate(params)
    target = tmp_path / "shipped" / "vit.pt"
    first = pretrain_flow(config=cfg, ship_to=str(target))
    record = json.loads(target.with_suffix(".json").read_text())
    assert not first["skipped"] and record["sha256"] == sha256(target) == first["backbone_sha256"]
    assert record["command"] == SHIP_COMMAND and record["settings"] == json.loads(json.dumps(shipped_settings(cfg)))
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["shipped_to"] == str(target) and "pretrain/local_heads" in parent.data.metrics
    stage = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")[0]
    assert [m.step for m in client.get_metric_history(stage.info.run_id, "loss")] == [1, 2, 3]  # per update
    assert {"locality.csv", "locality.png", "history.csv"} <= {a.path for a in client.list_artifacts(stage.info.run_id)}
    assert pretrain_flow(config=cfg)["skipped"]
