import pytest
import torch

import convheads


def tiny_vit(**kwargs):
    """A small random ViT (fast on CPU); kwargs override its shape."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    args.update(kwargs)
    return convheads.create_model("vit_tiny_patch16_224", **args).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_params(root) -> dict:
    """A pipeline configuration that runs end to end in seconds, everything under `root`."""
    from tasks.config import PipelineConfig

    cfg = PipelineConfig().model_dump(mode="json")
    cfg["paths"] = {"data": f"{root}/data/dataset", "outputs": f"{root}/outputs"}
    cfg["data"]["image_size"] = 16
    cfg["model"]["kwargs"] = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4}
    cfg["baseline"].update(epochs=2, batch_size=64)
    cfg["recover"].update(epochs=1, batch_size=64)
    cfg["score"]["max_images"] = 32
    cfg["benchmark"].update(batch_sizes=[1, 4], repeats=2, warmup=1)
    cfg["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
    return cfg


@pytest.fixture
def tiny_config(tmp_path):
    from tasks.config import validate

    return validate(tiny_params(tmp_path))


@pytest.fixture(scope="session")
def prefect_api():
    """A real, temporary Prefect server for the whole session (started once: it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def _finished_pipeline(tmp_path_factory):
    from tasks.config import validate
    from tasks.stage import execute
    from tasks.stages import STAGES

    root = tmp_path_factory.mktemp("finished")
    cfg = validate(tiny_params(root))
    for stage in STAGES.values():
        execute(stage, cfg)
    return root


@pytest.fixture
def finished_pipeline(_finished_pipeline, tmp_path):
    """A copy, under tmp_path, of the tiny pipeline's finished outputs (computed once per session)."""
    import shutil

    for part in ("data", "outputs"):
        shutil.copytree(_finished_pipeline / part, tmp_path / part)
    return tmp_path
