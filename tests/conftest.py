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
