"""The files a stage writes for the stages after it, and how those read them back: the dataset's
manifest and meta, models, scores and the selection. One place for the names, so a stage never
imports another stage to read its outputs."""
import json
from pathlib import Path

import torch
from torch import nn

from convheads import ConvHeadsError, HeadScores, Selection, load_model

from .config import PipelineConfig
from .runner import output_dir

MANIFEST, META = "manifest.csv", "meta.json"              # data
MODEL_FILE = "model.pt"                                   # baseline, replace, recover
HISTORY = "history.csv"                                   # baseline, recover: one row per epoch
# history.csv's copy of the task's headline metric on the validation split (val_top1 or val_miou):
# the one column dvc.yaml's plots can name for either task (its templating cannot pick by task)
HEADLINE = "val_headline"
SCORES, SCORES_TABLE = "scores.pt", "scores.csv"          # score
SELECTION = "selection.json"                              # select (and recover, for dsp)
# The models evaluate and benchmark compare: the stage whose model it is.
MODELS = {"baseline": "baseline", "replaced": "replace", "compressed": "recover"}
INT8_MODEL = "compressed_int8"  # the evaluate stage's name for the recovered model as deployed in INT8


def read_meta(cfg: PipelineConfig) -> dict:
    path = Path(cfg.paths.data) / META
    if not path.is_file():
        raise ConvHeadsError(f"no dataset at {cfg.paths.data} (missing {META}); run the data stage first")
    return json.loads(path.read_text())


def images_root(cfg: PipelineConfig) -> Path:
    """The folder the manifest's paths are relative to: the source folder, or the dataset folder
    itself for generated sources."""
    root = read_meta(cfg)["root"]
    return Path(cfg.paths.data) if root is None else Path(root)


def stage_model(cfg: PipelineConfig, stage: str) -> nn.Module:
    path = output_dir(cfg, stage) / MODEL_FILE
    if not path.is_file():
        raise ConvHeadsError(f"no model from stage {stage!r} at {path}; run the pipeline from the start")
    return load_model(path)


def load_scores(cfg: PipelineConfig) -> HeadScores:
    return HeadScores.from_dict(torch.load(output_dir(cfg, "score") / SCORES, weights_only=True))


def load_selection(cfg: PipelineConfig) -> Selection:
    return Selection.from_dict(json.loads((output_dir(cfg, "select") / SELECTION).read_text()))
