"""Fixtures. Shared helpers live in helpers.py (import them from there, never from here)."""
import shutil

import pytest
import torch
from helpers import tiny_params
from prefect.testing.utilities import prefect_test_harness

from pipeline.config import validate
from pipeline.dag import STAGES
from pipeline.runner import execute


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config(tmp_path):
    return validate(tiny_params(tmp_path))


@pytest.fixture(scope="session")
def prefect_api():
    """A real, temporary Prefect server for the whole session (started once: it takes seconds)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def _finished_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    cfg = validate(tiny_params(root))
    for stage in STAGES.values():
        execute(stage, cfg)
    return root


@pytest.fixture
def finished_pipeline(_finished_pipeline, tmp_path):
    """A copy, under tmp_path, of the tiny pipeline's finished outputs (computed once per session)."""
    for part in ("data", "outputs"):
        shutil.copytree(_finished_pipeline / part, tmp_path / part)
    return tmp_path
