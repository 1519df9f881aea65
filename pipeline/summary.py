"""The summary a person reads at the end of a run: accuracy, size and speed, and where the run is."""
from typing import Dict, Tuple

import pandas as pd
from scipy.stats import beta

from .artifacts import INT8_MODEL
from .config import PipelineConfig
from .problems import PROBLEMS
from .runner import read_record

# The table's first rows per task: (metric, label); the first is the headline.
QUALITY = {task: kind.quality for task, kind in PROBLEMS.items()}


def summary(cfg: PipelineConfig) -> Dict:
    """Headline numbers from the evaluate, benchmark and select stages."""
    ev, bench = read_record(cfg, "evaluate")["summary"], read_record(cfg, "benchmark")["summary"]
    sel, scored = selection_summary(cfg), read_record(cfg, "score")["summary"]
    b1, bn = cfg.benchmark.batch_sizes[0], cfg.benchmark.batch_sizes[-1]
    quality = {f"{model}_{metric}": ev[model][metric] for metric, _ in QUALITY[cfg.task]
               for model in ("baseline", "replaced", "compressed")}
    headline = QUALITY[cfg.task][0][0]
    return {
        "task": cfg.task, **quality, f"{headline}_drop": ev[f"{headline}_drop"],
        "heads_replaced": sel["heads_replaced"], "heads_total": sel["heads_total"],
        "whole_blocks": sel["whole_blocks"], "selected_by": sel.get("method"),
        **{k: scored[k] for k in ("local_heads", "local_share_max", "uniform_share")},
        "params_baseline": bench["baseline_params"], "params_compressed": bench["compressed_params"],
        "gmacs_baseline": bench["baseline_gmacs"], "gmacs_compressed": bench["compressed_gmacs"],
        "latency_ms_baseline": bench[f"baseline_b{b1}_ms"], "latency_ms_compressed": bench[f"compressed_b{b1}_ms"],
        "latency_batch_size": b1, f"speedup_b{b1}": bench[f"speedup_b{b1}"], f"speedup_b{bn}": bench[f"speedup_b{bn}"],
        "largest_batch_size": bn, "threads": bench["threads"], "img_size": bench["img_size"],
        "runtime": bench["runtime"], "other_runtimes": bench["runtimes"][1:],
        **{f"{r}_speedup_b{b}": bench[f"{r}_speedup_b{b}"] for r in bench["runtimes"][1:] for b in (b1, bn)},
        # onnxruntime-int8 benchmarked: the compressed model's accuracy as deployed in INT8
        **({f"{INT8_MODEL}_{headline}": ev[INT8_MODEL][headline]} if INT8_MODEL in ev else {}),
    }


def selection_summary(cfg: PipelineConfig) -> Dict:
    """What was replaced: the select stage's choice, or the one DSP learned in recovery."""
    return {**read_record(cfg, "select")["summary"], **read_record(cfg, "recover")["summary"].get("dsp", {})}


def summary_table(s: Dict) -> str:
    b1, bn = s["latency_batch_size"], s["largest_batch_size"]
    # segmentation models run at the dataset's resolution, not the classifier's: say which
    at = f" at {s['img_size'][0]} x {s['img_size'][1]}" if s.get("task") == "segmentation" else ""
    rows = [
        (f"test {label}", f"{s[f'baseline_{m}']:.2%}", f"{s[f'compressed_{m}']:.2%}",
         f"{(s[f'compressed_{m}'] - s[f'baseline_{m}']) * 100:+.2f} pts ("
         + ("Sigma's choice " if s.get("selected_by") == "dsp" else "")
         + f"before recovery: {s[f'replaced_{m}']:.2%})")
        for m, label in QUALITY[s.get("task", "classification")]
    ] + [
        (f"test {label}, INT8", "", f"{s[f'compressed_int8_{m}']:.2%}",
         f"{(s[f'compressed_int8_{m}'] - s[f'compressed_{m}']) * 100:+.2f} pts vs float32")
        for m, label in QUALITY[s.get("task", "classification")][:1] if f"compressed_int8_{m}" in s
    ] + [
        ("heads replaced", "-", f"{s['heads_replaced']} of {s['heads_total']}",
         f"whole blocks {', '.join(map(str, s['whole_blocks']))}" if s["whole_blocks"] else "scattered"),
        ("local heads (>= 50% in 3 x 3)", f"{s['local_heads']} of {s['heads_total']}", "",
         f"most local {s['local_share_max']:.0%}; uniform attention {s['uniform_share']:.0%}"),
        ("parameters", f"{s['params_baseline']:,}", f"{s['params_compressed']:,}",
         f"{s['params_compressed'] / s['params_baseline'] - 1:+.1%}"),
        ("GMACs / image", f"{s['gmacs_baseline']:.4g}", f"{s['gmacs_compressed']:.4g}",
         f"{s['gmacs_compressed'] / s['gmacs_baseline'] - 1:+.1%}"),
        (f"latency, batch {b1}{at} (ms)", f"{s['latency_ms_baseline']:.2f}", f"{s['latency_ms_compressed']:.2f}",
         f"speedup {s[f'speedup_b{b1}']:.3f}x ({s['runtime']}, {s['threads']} threads)"),
        (f"speedup, batch {bn}{at}", "", "", f"{s[f'speedup_b{bn}']:.3f}x ({s['runtime']})"),
    ] + [(f"speedup in {r}", "", "", f"batch {b1}: {s[f'{r}_speedup_b{b1}']:.3f}x, "
                                      f"batch {bn}: {s[f'{r}_speedup_b{bn}']:.3f}x") for r in s["other_runtimes"]]
    return pd.DataFrame(rows, columns=["", "baseline", "compressed", "change"]).to_string(index=False)


def binomial_interval(correct: int, n: int, level: float = 0.95) -> Tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a proportion of `correct` in `n` independent trials:
    how far top-1 on n test images can be from the model's accuracy on the whole distribution."""
    tail = (1 - level) / 2
    low = float(beta.ppf(tail, correct, n - correct + 1)) if correct else 0.0
    high = float(beta.ppf(1 - tail, correct + 1, n - correct)) if correct < n else 1.0
    return low, high
