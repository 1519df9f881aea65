"""Stage pretrain: masked image modelling of a ViT on crops of photographs (convheads.mim), and how
local its heads became, measured on held-out crops. Its backbone.pt is what model.checkpoint takes.

Not part of the compression pipeline (flows/pretrain.py and DVC's pretrain stage run it): the
embedded default ships its product in data/pretrained/, with a fingerprint (ship) that
tests/test_pretrain.py holds to the pretraining's own code (PRETRAIN_CODE) and configuration;
that the stage reproduces bit for bit is tested on a short run.
"""
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict

import numpy as np
import pandas as pd
import torch
from timm.data import resolve_data_config

from convheads import create_model, save_model, score_heads
from convheads.data.photos import PhotoCrops, folder_photos, load_photos
from convheads.locality import local_share, uniform_share
from convheads.mim import PretrainSettings, pretrain

from ..config import PipelineConfig, photo_settings
from ..plots import plot_locality
from ..runner import PROJECT, Stage

BACKBONE, HISTORY, LOCALITY, LOCALITY_PLOT = "backbone.pt", "history.csv", "locality.csv", "locality.png"
CHECKPOINT = "pretrain.ckpt"   # what an interrupted run resumes from (in the stage's work folder)
LOCAL_WINDOW = 3
HELD_OUT = 512                 # test crops the locality is measured on
# What a shipped checkpoint's fingerprint covers: the pretraining's own code (the rest of the library
# changes without changing a pretraining: it would be a ship on every edit).
PRETRAIN_CODE = ("convheads/mim.py", "convheads/data/photos.py", "pipeline/stages/pretrain.py")


def run(cfg: PipelineConfig, out: Path) -> Dict:
    p = cfg.pretrain
    photos = folder_photos(Path(p.path)) if p.source == "folder" else load_photos()
    crops = photo_settings(cfg.data)
    train = PhotoCrops(photos, crops, "train", scale=p.scale, flip=True)
    model = create_model(cfg.model.name, **{**p.kwargs, "num_classes": 0})
    dc = resolve_data_config({}, model=model)
    mean, std = (torch.tensor(cfg.model.mean or dc["mean"]).view(1, 3, 1, 1),
                 torch.tensor(cfg.model.std or dc["std"]).view(1, 3, 1, 1))

    def normalised(images: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std

    def batches(step: int) -> torch.Tensor:
        return normalised(np.stack([train.sample(step * p.batch_size + j)[0] for j in range(p.batch_size)]))

    settings = PretrainSettings(**{f: getattr(p, f) for f in PretrainSettings.__dataclass_fields__})
    history = pretrain(model, batches, settings, seed=cfg.seed, checkpoint=out / CHECKPOINT)
    save_model(model, out / BACKBONE)
    (out / CHECKPOINT).unlink(missing_ok=True)
    pd.DataFrame(history).to_csv(out / HISTORY, index=False)

    test = PhotoCrops(photos, crops, "test")
    held_out = normalised(np.stack([test.sample(i)[0] for i in range(HELD_OUT)]))
    scores = score_heads(model, [held_out[i:i + 64] for i in range(0, HELD_OUT, 64)], progress=False)
    local = local_share(scores, LOCAL_WINDOW)
    uniform = uniform_share(scores.grid_size, scores.num_prefix_tokens, LOCAL_WINDOW)
    depth, heads = local.shape
    pd.DataFrame([{"block": b, "head": h, "local_share": local[b, h].item(), "sigma_h": scores.sigma_h[b, h].item()}
                  for b in range(depth) for h in range(heads)]).to_csv(out / LOCALITY, index=False)
    plot_locality(local, scores.sigma_h, uniform, out / LOCALITY_PLOT,
                  f"pretrained {cfg.model.name} ({settings.steps} updates), {HELD_OUT} held-out crops")
    return {"steps": settings.steps, "final_loss": history[-1]["loss"], "photos": len(photos),
            "local_heads": int((local >= 0.5).sum()), "heads": depth * heads,
            "local_share_max": local.max().item(), "local_share_mean": local.mean().item(),
            "uniform_share": uniform, "backbone_sha256": sha256(out / BACKBONE)}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_settings(cfg: PipelineConfig) -> Dict:
    """What the pretrained backbone depends on: the settings a shipped checkpoint's fingerprint records."""
    return {"model": cfg.model.name, "mean": cfg.model.mean, "std": cfg.model.std, "seed": cfg.seed,
            "pretrain": cfg.section("pretrain")["pretrain"], "photos": asdict(photo_settings(cfg.data))}


def pretrain_code() -> Dict[str, str]:
    """{file: sha256} of PRETRAIN_CODE."""
    return {f: sha256(PROJECT / f) for f in PRETRAIN_CODE}


def ship(outputs: Path, checkpoint: Path, record: Dict) -> Path:
    """Copy the stage's backbone to `checkpoint` with a fingerprint beside it (<checkpoint>.json):
    its sha256 and what produced it (`record`: the stage's configuration, code version, command)."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(outputs / BACKBONE, checkpoint)
    fingerprint = {"sha256": sha256(checkpoint), **record}
    checkpoint.with_suffix(".json").write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    return checkpoint


STAGE = Stage("pretrain", run, ("model", "pretrain", "data", "seed"))
