"""Building, checkpoint loading and save/load, with the errors users hit."""
import pytest
import torch

import convheads
from convheads import ConvHeadsError, create_model, load_checkpoint, load_model, save_model
from conftest import tiny_vit


def test_a_local_checkpoint_gives_the_same_model(tmp_path):
    model = tiny_vit()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pth")
    again = create_model("vit_tiny_patch16_224", checkpoint=tmp_path / "ckpt.pth", img_size=32, patch_size=8,
                         embed_dim=32, depth=3, num_heads=4, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), model(x))


def test_a_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    torch.save(tiny_vit(num_classes=7).state_dict(), tmp_path / "ckpt.pth")
    with pytest.raises(ConvHeadsError, match=r"does not fit the model \(shape mismatches.*head.weight"):
        load_checkpoint(tiny_vit(), tmp_path / "ckpt.pth")
    torch.save(tiny_vit(depth=2).state_dict(), tmp_path / "short.pth")
    with pytest.raises(ConvHeadsError, match="missing keys: blocks.2"):
        load_checkpoint(tiny_vit(), tmp_path / "short.pth")


@pytest.mark.parametrize("content, match", [
    (None, "checkpoint file not found"),
    (b"", "cannot read"),
    (b"this is not a checkpoint", "cannot read"),
])
def test_missing_and_corrupt_files(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    for load in (lambda: load_model(path), lambda: load_checkpoint(tiny_vit(), path)):
        with pytest.raises(ConvHeadsError, match=match):
            load()


def test_load_model_refuses_a_plain_state_dict(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ConvHeadsError, match="not a convheads model file"):
        load_model(tmp_path / "plain.pt")


def test_a_compressed_file_is_not_a_plain_checkpoint(tmp_path):
    model = convheads.replace_heads(tiny_vit(), convheads.Selection({0: [0]}))
    save_model(model, tmp_path / "m.pt")
    with pytest.raises(ConvHeadsError, match="load it with convheads.load_model"):
        load_checkpoint(tiny_vit(), tmp_path / "m.pt")


def test_saving_needs_a_build_spec(tmp_path):
    import timm
    with pytest.raises(ConvHeadsError, match="convheads.create_model"):
        save_model(timm.create_model("vit_tiny_patch16_224", img_size=32), tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    model = tiny_vit()
    path = save_model(model, tmp_path / "m.pt")
    before = path.read_bytes()

    def broken_save(obj, f):  # save_model writes through a file object
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ConvHeadsError, match="unknown timm model 'vit_tiny_patch16_22'; did you mean vit_tiny_patch16_224"):
        create_model("vit_tiny_patch16_22")


def test_bad_build_arguments_and_sizes():
    with pytest.raises(ConvHeadsError, match="timm cannot build"):
        create_model("vit_tiny_patch16_224", not_an_argument=1)
    with pytest.raises(ConvHeadsError, match=r"img_size \(30, 30\) is not divisible by patch_size \(16, 16\)"):
        create_model("vit_tiny_patch16_224", img_size=30)


def test_pretrained_weights_offline_fail_with_advice(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, not after timeouts
    with pytest.raises(ConvHeadsError, match="could not get the pretrained weights.*local checkpoint"):
        create_model("vit_tiny_patch16_224", pretrained=True)
