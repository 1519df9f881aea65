"""Stage recover: fine-tune the replaced model to recover accuracy (step 3 of the method).

With select.method=dsp the choice itself is learned here: the stage gates every block of the
baseline (convheads.dsp), trains gates and weights together while the temperature falls, and
finalises the hard top-k into an ordinary replaced model. It writes that model, the choice
(selection.json), the gates per epoch (gates.csv, gates.png: logits, weights, temperature).
The select and replace stages still run for dsp: they give Sigma's choice at the same budget,
which is the "replaced" (before recovery) model that evaluate reports beside it.
"""
import json
from pathlib import Path
from typing import Dict, List

import pandas as pd
from matplotlib.figure import Figure

from convheads import vit_info
from convheads.dsp import finalise, gate_log, gate_model

from ..artifacts import SELECTION, load_scores, load_selection, stage_model
from ..config import DSP, PipelineConfig
from ..finetune import fine_tune
from ..runner import Stage

GATES_TABLE, GATES_PLOT = "gates.csv", "gates.png"


def run(cfg: PipelineConfig, out: Path) -> Dict:
    if cfg.select.method == DSP:
        return learn_selection(cfg, out)
    return fine_tune(cfg, "recover", stage_model(cfg, "replace"), out, fold=True)


def learn_selection(cfg: PipelineConfig, out: Path) -> Dict:
    """DSP: gates on the baseline, trained with it; the hard top-k at the end is the selection."""
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
        return {"dsp": {"k": k, "granularity": cfg.select.granularity, "heads_replaced": selection.num_replaced,
                        "heads_total": info.depth * info.num_heads, "selection": json.loads(selection.to_json()),
                        "whole_blocks": sorted(b for b, h in selection.heads.items() if len(h) == info.num_heads),
                        "temperature_end": gates.temperature}}

    return fine_tune(cfg, "recover", model, out, prepare=prepare,
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
