"""The MLflow UI shows a registered version's model card: checked in a headless browser.

    python -m benchmarks.mlflow_ui    # writes docs/figures/mlflow_model_card.png

Runs the tiny pipeline (pipeline.config.tiny_params: every stage in seconds) in a temporary folder
and registers its model, whose version description is the model card; starts `mlflow server` on
that store, opens the version's page in headless Chromium (Debian's /usr/bin/chromium: `apt-get
install chromium`), checks that the rendered page shows the card's headline and its metric row,
and takes a screenshot of it.
"""
import argparse
import contextlib
import html
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from convheads import ConvHeadsError
from pipeline.config import tiny_params, validate
from pipeline.dag import STAGES
from pipeline.registry import register
from pipeline.runner import execute
from pipeline.tracking import client_for, log_all

from .results import PROJECT

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = PROJECT / "docs" / "figures" / "mlflow_model_card.png"
# the network is closed: without these Chromium waits on connections it will never get
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1280,1060"]


def registered_version(root: Path):
    """The tiny pipeline run in `root`, logged and registered: its config, version and model card."""
    cfg = validate(tiny_params(root))
    for stage in STAGES.values():
        execute(stage, cfg)
    version = register(cfg, log_all(cfg))["version"]
    card = client_for(cfg).get_model_version(cfg.registered_model_name, str(version)).description
    return cfg, version, card


@contextlib.contextmanager
def mlflow_server(store_uri: str, cwd: Path):
    """`mlflow server` on a free local port over `store_uri`; yields its URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--backend-store-uri", store_uri],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise ConvHeadsError("mlflow server exited")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise ConvHeadsError("mlflow server did not answer within 180 s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def chromium(url: str, *args: str, wait_ms: int = 20_000) -> str:
    """Headless Chromium on `url` with a fresh profile, after `wait_ms` of the page's (virtual) time: its stdout."""
    if not Path(CHROMIUM).exists():
        raise ConvHeadsError(f"no {CHROMIUM}: install Debian's Chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
                               *args, url], capture_output=True, text=True, timeout=180)
    if done.returncode:
        raise ConvHeadsError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def page_text(dom: str) -> str:
    """The visible text of a serialised DOM, whitespace collapsed."""
    dom = re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", dom)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def check(root: Path, screenshot: Path = SCREENSHOT) -> dict:
    """Register the tiny pipeline's model under `root`, open its version's page in the MLflow UI and
    check it shows the card; the page's text and what was looked for. Raises if it is not shown."""
    cfg, version, card = registered_version(root)
    headline = card.splitlines()[0].removeprefix("# ")  # "convheads-vit_tiny_patch16_224 version 1"
    row = re.search(r"^\| test top-1 \| \*\*([\d.]+%)\*\*", card, re.M).group(1)  # the metric, as rendered
    wanted = [headline, f"test top-1 {row}"]
    with mlflow_server(cfg.tracking.tracking_uri, root) as url:
        page = f"{url}/#/models/{cfg.registered_model_name}/versions/{version}"
        text = page_text(chromium(page, "--dump-dom"))
        missing = [w for w in wanted if w not in text]
        if missing:
            raise ConvHeadsError(f"the MLflow UI's page {page} does not show {missing}; it shows: {text[:2000]}")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        chromium(page, f"--screenshot={screenshot}")
    return {"page": page, "wanted": wanted, "text": text, "screenshot": screenshot}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mlflow_ui", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--screenshot", type=Path, default=SCREENSHOT, help=f"default: {SCREENSHOT.relative_to(PROJECT)}")
    args = p.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"error: no {CHROMIUM}: install Debian's Chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="mlflow_ui_"))
    try:
        shown = check(root, args.screenshot)
    except ConvHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{shown['page']} shows {shown['wanted']}; screenshot: {shown['screenshot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
