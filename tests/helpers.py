"""What the tests share: small models, a tiny pipeline configuration, a stage started in a process."""
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import convheads
from pipeline.config import tiny_params  # noqa: F401 (the tests' smoke configuration, re-exported)

PROJECT = Path(__file__).resolve().parent.parent
# Sigma_h of a 3-block, 3-head model, for the selection tests
SIGMA = [[5.0, 1.0, 7.0],
         [2.0, 2.0, 9.0],
         [0.5, 8.0, 8.0]]


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

def start_until_checkpoint(command, outputs, stage: str, poll: float = 0.02):
    """Start a stage's command line in the project; return (the process, a function listing its
    checkpoints) once it has written its first epoch's checkpoint (or ended, or 300 s passed)."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *command], cwd=PROJECT,
                               env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    checkpoints = lambda: list(Path(outputs).glob(f".{stage}.*.partial/resume.pt"))  # noqa: E731
    deadline = time.monotonic() + 300
    while not checkpoints() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(poll)
    return process, checkpoints


def head_scores(sigma, grid_size=(2, 2), num_prefix_tokens=1, **fields) -> convheads.HeadScores:
    """HeadScores with Sigma_h `sigma` [depth, heads] and zeros (or `fields`) for what a test does not need."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    (depth, heads), P = sigma.shape, num_prefix_tokens
    h, w = grid_size
    N = P + h * w
    zeros = dict(offset_attention=torch.zeros(depth, heads, 2 * h - 1, 2 * w - 1, dtype=torch.float64),
                 patch_to_prefix=torch.zeros(depth, heads, P), prefix_to_patches=torch.zeros(depth, heads, P),
                 prefix_to_prefix=torch.zeros(depth, heads, P, P),
                 mean_attention=torch.full((depth, heads, N, N), 1 / N, dtype=torch.float16))
    return convheads.HeadScores(sigma_h=sigma, num_images=10, grid_size=grid_size, num_prefix_tokens=P,
                                **{**zeros, **fields})


def seg_params(root, **segmentation) -> dict:
    """tiny_params for task=segmentation: 32 x 32 scenes (an 8 x 8 patch grid), a few of them."""
    params = tiny_params(root)
    params["task"] = "segmentation"
    params["segmentation"] = {"image_size": 32, "feature_blocks": [0, 1],
                              "scenes": {"train": 48, "val": 16, "test": 16}, **segmentation}
    params["model"]["kwargs"] = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4}
    params["baseline"].update(epochs=2, batch_size=16)
    params["recover"].update(epochs=1, batch_size=16)
    params["score"]["max_images"] = 16
    return params


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store_uri: str, cwd: Path):
    """A real `mlflow server` on a free local port over `store_uri`; yields its URL once it answers."""
    import requests

    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", url.rsplit(":", 1)[1], "--workers", "1", "--backend-store-uri", store_uri],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, "mlflow server exited"
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer within 180 s"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
