"""Stage recover: fine-tune the replaced model to recover accuracy (step 3 of the method).

With select.method=dsp the choice itself is learned here: the stage gates every block of the
baseline (convheads.dsp), trains gates and weights together while the temperature falls, and
finalises the hard top-k into an ordinary replaced model, which then trains alone for the last
select.dsp.hard_epochs (the gated epochs end at the temperature's floor, still on noise). It writes
that model, the choice (selection.json), the gates per epoch (gates.csv, gates.png: logits,
weights, temperature).
The select and replace stages still run for dsp: they give Sigma's choice at the same budget,
which is the "replaced" (before recovery) model that evaluate reports beside it.
"""
import json
import shutil
from pathlib import Path
from typing import Dict, List

import pandas as pd
from matplotlib.figure import Figure

from convheads import load_model, vit_info
from convheads.dsp import finalise, gate_log, gate_model
from convheads.engine import distributed

from ..artifacts import HISTORY, MODEL_FILE, SELECTION, load_scores, load_selection, stage_model
from ..config import DSP, PipelineConfig, merge, validate
from ..finetune import fine_tune
from ..runner import Stage

GATES_TABLE, GATES_PLOT = "gates.csv", "gates.png"
GATED = "gated"       # the gated epochs' folder: its model.pt is the finalised model the hard epochs start from
DSP_FILE = "dsp.json"  # what the gates chose, written there before the model


def run(cfg: PipelineConfig, out: Path) -> Dict:
    if cfg.select.method == DSP:
        return learn_selection(cfg, out)
    return fine_tune(cfg, "recover", stage_model(cfg, "replace"), out, fold=True)


def learn_selection(cfg: PipelineConfig, out: Path) -> Dict:
    """DSP: gates on the baseline, trained with it; the hard top-k at the end is the selection, and the
    finalised model trains on for select.dsp.hard_epochs."""
    hard = min(cfg.select.dsp.hard_epochs, cfg.recover.epochs - 1)
    gated = out / GATED
    gated.mkdir(exist_ok=True)
    if not (gated / MODEL_FILE).is_file():  # a rerun after a kill in the hard epochs starts from it
        train_gates(_with_epochs(cfg, cfg.recover.epochs - hard), out, gated)
    distributed.barrier()  # rank 0 wrote the finalised model
    learned = json.loads((gated / DSP_FILE).read_text())
    if hard == 0:
        shutil.copyfile(gated / MODEL_FILE, out / MODEL_FILE)
        shutil.copyfile(gated / HISTORY, out / HISTORY)
        return learned
    return {**fine_tune(_with_epochs(cfg, hard), "recover", load_model(gated / MODEL_FILE), out), **learned,
            "gated_epochs": cfg.recover.epochs - hard}


def _with_epochs(cfg: PipelineConfig, epochs: int) -> PipelineConfig:
    """The configuration of one of DSP's two phases: `epochs` recovery epochs, all of them this phase's."""
    return validate(merge(cfg.model_dump(mode="json"), {"recover": {"epochs": epochs},
                                                        "select": {"dsp": {"hard_epochs": 0}}}))


def train_gates(cfg: PipelineConfig, out: Path, gated: Path) -> Dict:
    """The gated epochs: gates and weights train together; the finalised model goes to `gated`."""
    model, r, d = stage_model(cfg, "baseline"), cfg.replace, cfg.select.dsp
    info = vit_info(model)
    budget = load_selection(cfg)  # Sigma's choice at the configured budget: k is its size
    k = len(budget.heads) if cfg.select.granularity == "block" else budget.num_replaced
    gates = gate_model(model, k, cfg.select.granularity, kernel_size=r.kernel_size, init=r.init, variant=r.variant,
                       scores=load_scores(cfg) if r.init == "attention" else None,
                       temperature=(d.temperature_start, d.temperature_end), seed=cfg.seed, lr=d.gate_lr)
    log: List[Dict] = []

    def prepare(train_loader) -> None:  # the schedule in training forward passes
        rc = cfg.recover
        steps = len(train_loader) // rc.accumulation * rc.accumulation
        gates.anneal_steps = steps * (d.anneal_epochs or rc.epochs)
        log.extend(gate_log(gates, 0))

    def finish(model) -> Dict:
        selection = finalise(model)
        (out / SELECTION).write_text(selection.to_json() + "\n")
        table = pd.DataFrame(log)
        table.to_csv(out / GATES_TABLE, index=False)
        plot_gates(table, k, cfg.select.granularity, out / GATES_PLOT)
        learned = {"dsp": {"k": k, "granularity": cfg.select.granularity, "heads_replaced": selection.num_replaced,
                        "heads_total": info.depth * info.num_heads, "selection": json.loads(selection.to_json()),
                        "whole_blocks": sorted(b for b, h in selection.heads.items() if len(h) == info.num_heads),
                        "temperature_end": gates.temperature}}
        (gated / DSP_FILE).write_text(json.dumps(learned) + "\n")
        return learned

    return fine_tune(cfg, "recover", model, gated, prepare=prepare,
                     on_epoch=lambda row: log.extend(gate_log(gates, row["epoch"])), finish=finish)


def plot_gates(table: pd.DataFrame, k: int, granularity: str, path: Path) -> None:
    """Each gate's noiseless soft top-k weight and logit per epoch, and the temperature."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    weight_ax, logit_ax, temp_ax = fig.subplots(1, 3)
    for gate, rows in table.groupby("gate"):
        weight_ax.plot(rows.epoch, rows.weight, marker=".", label=f"{granularity} {gate}")
        logit_ax.plot(rows.epoch, rows.logit, marker=".")
    per_epoch = table.groupby("epoch").temperature.first()
    temp_ax.semilogy(per_epoch.index, per_epoch.values, marker="o")
    weight_ax.set(xlabel="epoch", ylabel="weight of the convolution", title=f"gates (k = {k}): soft top-k, no noise")
    logit_ax.set(xlabel="epoch", ylabel="logit", title="gate logits")
    temp_ax.set(xlabel="epoch", ylabel="temperature", title="temperature (log-linear)")
    if table.gate.nunique() <= 12:
        weight_ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


# dsp (select.method) trains gates on the baseline with the scores' init, to the select stage's budget
STAGE = Stage("recover", run, ("segmentation", "recover", "device", "precision"),
              needs=("replace", "baseline", "score", "select"))
