"""The data pipeline at scale: peak memory and hashing speed of the data stage, and a training
epoch's peak memory, on generated ImageNet-style folders of different sizes.

    python -m benchmarks.data_scale                       # 2,000 and 20,000 images at 256 x 256
    python -m benchmarks.data_scale --images 500 --epoch-images 500 --quick   # a smoke run

For each size it generates (once) <root>/<N>/images/{train,val}/<class>/<i>.JPEG, then runs the
stages as a user would (`python -m pipeline run data|baseline`, in a child process) and samples that
process's memory (RSS) and its workers' (USS: shared pages counted once) every 50 ms:

  data, first run      the manifest from scratch: every image read, hashed and checked (the
                       stage's own time, as it reports it; the process's start is left out)
  data, incremental    after adding 1% new images and rewriting 1%: only those are read
  training epoch       one epoch of a small ViT (64 px) through timm's transforms in DataLoader workers

and reports what the stage wrote under data/ beside the images' own size. Results go to the
terminal and to results/data_scale.csv with its stamp (benchmarks/results.py), which the docs'
data page shows.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml

from .results import RESULTS, write_results

CLASSES = 10
VAL_SHARE = 0.1       # of each class, in val/ (ImageNet: 50 of 1,300)


def _write(args) -> int:
    """One synthetic photo-like JPEG: smooth random structure plus noise (~30 KB at 256 px, quality 90)."""
    from PIL import Image

    path, size, seed = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def generate(folder: Path, n: int, size: int, start: int = 0, workers: int = 2) -> int:
    """n images numbered from `start`, spread over CLASSES classes and train/ (90%) / val/ (10%)."""
    jobs = []
    for i in range(start, start + n):
        split = "val" if (i // CLASSES) % round(1 / VAL_SHARE) == 0 else "train"
        path = folder / split / f"class{i % CLASSES:02d}" / f"img{i:07d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((path, size, i))
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_write, jobs, chunksize=64))


def measured(cmd, env=None, every_s: float = 0.05) -> dict:
    """Run `cmd`; its wall time and peak memory (MiB): the process's resident set (RSS), and with
    its child processes (hashing or DataLoader workers) the RSS plus the children's unique memory
    (USS: what they share with the parent, e.g. torch's libraries, is counted once)."""
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_total = peak_main = 0.0
    children = 0
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            main = proc.memory_info().rss / 2**20
            kids = proc.children(recursive=True)
            unique = 0.0
            for p in kids:
                try:
                    unique += p.memory_full_info().uss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak_main, peak_total = max(peak_main, main), max(peak_total, main + unique)
            children = max(children, len(kids))
        except psutil.NoSuchProcess:
            pass
        time.sleep(every_s)
    seconds = time.perf_counter() - start
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{out[-3000:]}")
    return {"seconds": seconds, "peak_mib": peak_total, "peak_main_mib": peak_main, "children": children, "log": out}


def stage_seconds(log: str, stage: str) -> float:
    """The stage's own time, as `python -m pipeline run` reports it (without the interpreter's start)."""
    found = re.search(rf"^{stage}: done in ([0-9.]+) s", log, re.M)
    if not found:
        raise SystemExit(f"no '{stage}: done in ... s' line in:\n{log[-2000:]}")
    return float(found.group(1))


def params(work: Path, images: Path, workers: int) -> Path:
    cfg = {
        "paths": {"data": str(work / "data/dataset"), "outputs": str(work / "outputs")},
        "data": {"source": "folder", "path": str(images)},
        "model": {"kwargs": {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}},
        "loader": {"num_workers": workers},
        "baseline": {"epochs": 1, "batch_size": 64, "augment": "timm"},
        "evaluate": {"batch_size": 64},
        "tracking": {"tracking_uri": f"sqlite:///{work}/mlflow.db"},
    }
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_size(root: Path, n: int, size: int, workers: int, epoch: bool) -> dict:
    work = root / str(n)
    images = work / "images"
    stamp = work / "generated.json"
    if not stamp.is_file():
        print(f"generating {n:,} images of {size} x {size} in {images} ...", flush=True)
        stamp.write_text(json.dumps({"bytes": generate(images, n, size)}))
    for stale in (work / "data", work / "outputs"):
        subprocess.run(["rm", "-rf", str(stale)], check=True)
    cfg = params(work, images, workers)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stage = [sys.executable, "-m", "pipeline", "run", "--params", str(cfg)]
    row = {"images": n, "image_bytes": du(images), "load_before": os.getloadavg()[0]}

    first = measured(stage + ["data"], env)
    first_s = stage_seconds(first["log"], "data")
    row.update(data_first_s=first_s, data_first_images_per_s=n / first_s, data_first_process_s=first["seconds"],
               data_first_peak_mib=first["peak_mib"], data_first_peak_main_mib=first["peak_main_mib"])
    row["data_dir_bytes"] = du(work / "data/dataset")

    changed = max(1, n // 100)
    generate(images, changed, size, start=10**6 + n)                        # 1% new images
    rewrite = sorted((images / "train").rglob("*.JPEG"))[:changed]
    for i, path in enumerate(rewrite):                                       # 1% rewritten
        _write((path, size, 2 * 10**6 + i))
    again = measured(stage + ["data"], env)
    again_s = stage_seconds(again["log"], "data")
    read = [line for line in again["log"].splitlines() if line.startswith("data: ") and "images" in line]
    row.update(data_incremental_s=again_s, data_incremental_images_per_s=(n + changed) / again_s,
               data_incremental_changed=2 * changed, data_incremental_peak_mib=again["peak_mib"],
               data_incremental_log=read[-1] if read else "")
    if epoch:
        train = measured(stage + ["baseline"], env)
        row.update(epoch_s=stage_seconds(train["log"], "baseline"), epoch_peak_mib=train["peak_mib"],
                   epoch_peak_main_mib=train["peak_main_mib"], epoch_workers=train["children"])
    # leave the folder as generated, for the next run of this benchmark
    for path in images.rglob("*.JPEG"):
        if int(path.stem[3:]) >= 10**6:
            path.unlink()
    for path in rewrite:
        _write((path, size, int(path.stem[3:])))
    row["load_after"] = os.getloadavg()[0]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[2000, 20000], help="dataset sizes (images)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--root", type=Path, default=Path("/tmp/convheads-data-scale"), help="where the folders go")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers / hashing processes (default 1)")
    p.add_argument("--no-epoch", action="store_true", help="skip the training epoch")
    p.add_argument("--out", type=Path, default=RESULTS, help="where data_scale.csv and its stamp go")
    args = p.parse_args(argv)
    rows = [run_size(args.root, n, args.size, args.workers, not args.no_epoch) for n in args.images]
    table = pd.DataFrame(rows)
    write_results("data_scale", table, page="data", root=args.out,
                  title=f"The data stage and a training epoch on generated folders of {args.size} px JPEGs",
                  columns=[c for c in table if c != "data_incremental_log"],
                  notes=f"{args.workers} hashing process(es) / DataLoader worker(s). Times in seconds as each stage "
                        "reports them, peak memory in MiB (the process's RSS plus its workers' unique memory); "
                        "`incremental` is the rerun after adding 1% new images and rewriting 1%. `load_before` "
                        "and `load_after` are the machine's load average: times on a loaded machine are slower, "
                        "memory is not."),
    shown = table.drop(columns=["data_incremental_log"]).set_index("images").T
    with pd.option_context("display.float_format", "{:,.1f}".format, "display.width", 160):
        print(shown.to_string())
    for row in rows:
        print(f"{row['images']:,} images: {row['data_incremental_log']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
