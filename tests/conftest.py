import pytest
import torch

import convheads


def tiny_vit(**kwargs):
    """A small random ViT (fast on CPU); kwargs override its shape."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    args.update(kwargs)
    return convheads.create_model("vit_tiny_patch16_224", **args).eval()


def prefixed_vit(prefix: int, **kwargs):
    """tiny_vit on a 5 x 3 patch grid with `prefix` prefix tokens (a CLS token, then registers)."""
    return tiny_vit(img_size=(40, 24), class_token=prefix > 0, reg_tokens=max(0, prefix - 1),
                    global_pool="token" if prefix else "avg", **kwargs)


def value_and_output_weights(attn):
    """Copies of an attention module's W_V, b_V (the value rows of qkv) and W_O, b_O."""
    C = attn.qkv.in_features
    return (attn.qkv.weight[2 * C:].detach().clone(), attn.qkv.bias[2 * C:].detach().clone(),
            attn.proj.weight.detach().clone(), attn.proj.bias.detach().clone())


def banded_attention(kernel: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The fixed [hw, hw] attention matrix A with A[p, p + delta] = kernel[centre + delta]."""
    k = kernel.shape[-1]
    r = k // 2
    A = torch.zeros(h * w, h * w)
    for py in range(h):
        for px in range(w):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    qy, qx = py + dy, px + dx
                    if 0 <= qy < h and 0 <= qx < w:
                        A[py * w + px, qy * w + qx] = kernel[r + dy, r + dx]
    return A


def replaced_tiny(**kwargs):
    """Every kind of replaced block, 3 prefix tokens: scattered depthwise heads (block 0), an identity
    block (1), an original block (2) and an unfolded ensemble with unequal head weights (3)."""
    model = tiny_vit(depth=4, reg_tokens=2, **kwargs)
    convheads.replace_heads(model, convheads.Selection({0: [1, 2]}))
    convheads.replace_heads(model, convheads.Selection.from_blocks([1], 4), variant="identity")
    convheads.replace_heads(model, convheads.Selection.from_blocks([3], 4), variant="ensemble")
    with torch.no_grad():
        model.blocks[3].attn.logits.normal_(std=0.02)
    return model


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
    from tasks.runner import execute
    from tasks.pipeline import STAGES

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


def start_until_checkpoint(command, outputs, stage: str, poll: float = 0.02):
    """Start a stage's command line in the project; return (the process, a function listing its
    checkpoints) once it has written its first epoch's checkpoint (or ended, or 300 s passed)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    project = Path(__file__).resolve().parent.parent
    process = subprocess.Popen([sys.executable, "-m", "tasks", *command], cwd=project,
                               env={**os.environ, "PYTHONPATH": str(project)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    checkpoints = lambda: list(Path(outputs).glob(f".{stage}.*.partial/resume.pt"))  # noqa: E731
    deadline = time.monotonic() + 300
    while not checkpoints() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(poll)
    return process, checkpoints
