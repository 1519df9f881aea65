"""The MLflow UI's page of a registered version shows its model card, rendered in headless Chromium."""
from pathlib import Path

import pytest

from benchmarks.mlflow_ui import CHROMIUM, check


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_model_card(finished_pipeline, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium): the MLflow UI is not checked in a browser")
    shown = check(finished_pipeline, tmp_path / "page.png")  # raises if the page does not show the card
    headline, row = shown["wanted"]
    assert headline == "convheads-vit_tiny_patch16_224 version 1" and row.startswith("test top-1 ")
    assert headline in shown["text"] and row in shown["text"] and "Description" in shown["text"]
    assert shown["page"].endswith("/#/models/convheads-vit_tiny_patch16_224/versions/1")
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
