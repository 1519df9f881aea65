"""Building, checkpoint loading and save/load, with the errors users hit."""
import pytest
import torch
from helpers import tiny_vit

import convheads
from convheads import ConvHeadsError, create_model, load_checkpoint, load_model, save_model


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


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", dict(img_size=32, num_classes=7)),
    ("vit_small_patch14_reg4_dinov2.lvd142m", dict(img_size=28, depth=2, drop_path_rate=0.1)),
    ("vit_small_patch16_224", dict(img_size=32, depth=2, global_pool="avg", class_token=False, qkv_bias=False)),
])
def test_models_made_by_timm_save_and_load(tmp_path, name, kwargs):
    import timm
    model = timm.create_model(name, **kwargs).eval()
    convheads.replace_heads(model, convheads.Selection({0: [0]}))
    again = load_model(save_model(model, tmp_path / "m.pt"))
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.pretrained_cfg["mean"] == model.pretrained_cfg["mean"]  # the preprocessing travels too


def test_a_timm_model_that_cannot_be_rebuilt_names_the_difference(tmp_path):
    import timm
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, norm_layer=torch.nn.Identity)
    with pytest.raises(ConvHeadsError, match=r"cannot tell how this vit_tiny_patch16_224 was built.*norm1.*Identity"):
        save_model(model, tmp_path / "m.pt")
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
    with pytest.raises(ConvHeadsError,
                       match="unknown timm model 'vit_tiny_patch16_22'; did you mean vit_tiny_patch16_224"):
        create_model("vit_tiny_patch16_22")


def test_bad_build_arguments_and_sizes():
    with pytest.raises(ConvHeadsError, match="timm cannot build"):
        create_model("vit_tiny_patch16_224", not_an_argument=1)
    with pytest.raises(ConvHeadsError, match=r"img_size \(30, 30\) is not divisible by patch_size \(16, 16\)"):
        create_model("vit_tiny_patch16_224", img_size=30)


def test_tagged_names_and_hub_ids():
    model = create_model("vit_small_patch14_dinov2.lvd142m", device="meta", img_size=28, depth=1)
    assert model.pretrained_cfg["tag"] == "lvd142m" and model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert create_model("vit_base_patch16_224.augreg_in21k", device="meta").pretrained_cfg["num_classes"] == 21843
    with pytest.raises(ConvHeadsError,
                       match="no pretrained tag 'nope' for vit_small_patch14_dinov2; its tags: lvd142m"):
        create_model("vit_small_patch14_dinov2.nope")
    with pytest.raises(ConvHeadsError, match="not a Hugging Face Hub id; write hf-hub:<org>/<repo>"):
        create_model("hf-hub:vit_small")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub's settings, restored afterwards, with an empty cache under tmp_path."""
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return hub


def test_offline_fails_fast_and_says_so(hub):
    import time
    hub.HF_HUB_OFFLINE = True
    for name, pretrained, what in [("vit_tiny_patch16_224", True, "pretrained weights"),
                                   ("hf-hub:timm/vit_tiny_patch16_224", False, "configuration")]:
        start = time.perf_counter()
        with pytest.raises(ConvHeadsError, match=rf"offline \(HF_HUB_OFFLINE is set\): cannot download the {what}.*"
                                                 r"model.checkpoint"):
            create_model(name, pretrained=pretrained)
        assert time.perf_counter() - start < 5


def test_an_unreachable_hub_switches_to_offline_mode(hub):
    hub.ENDPOINT = "http://127.0.0.1:9"  # nothing listens there: refused at once
    with pytest.raises(ConvHeadsError, match=r"offline \(127.0.0.1 cannot be reached\)"):
        create_model("vit_tiny_patch16_224", pretrained=True)
    assert hub.HF_HUB_OFFLINE  # the hub's own calls now use the local cache, without retries


def test_offline_pretrained_weights_load_from_the_local_cache(hub, tmp_path):
    """Weights downloaded elsewhere and copied into the Hugging Face cache load without network."""
    import timm
    from safetensors.torch import save_file
    hub.HF_HUB_OFFLINE = True
    repo = tmp_path / "hf/models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("0" * 40)
    donor = timm.create_model("vit_tiny_patch16_224")
    save_file(donor.state_dict(), snapshot / "model.safetensors")
    model = create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True, img_size=32, num_classes=3)
    assert torch.equal(model.blocks[2].attn.qkv.weight, donor.blocks[2].attn.qkv.weight)
    assert model.pos_embed.shape == (1, 5, 192) and model.head.weight.shape == (3, 192)  # resampled, new head


def test_an_original_dinov2_checkpoint_loads_at_another_resolution(tmp_path):
    """facebookresearch/dinov2 weights (mask_token, register_tokens, a 518 px grid) fit a smaller timm model."""
    import timm
    kwargs = dict(embed_dim=32, depth=1, num_heads=2)
    dinov2 = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=70, **kwargs)  # 5 x 5 grid
    state = {k: v for k, v in dinov2.state_dict().items() if k not in ("reg_token", "cls_token", "pos_embed")}
    state.update(mask_token=torch.zeros(1, 32), register_tokens=dinov2.reg_token.detach(),
                 cls_token=dinov2.cls_token.detach(), pos_embed=torch.cat([torch.zeros(1, 1, 32), dinov2.pos_embed], 1))
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    checkpoint = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    model = create_model("vit_small_patch14_reg4_dinov2.lvd142m", checkpoint=checkpoint,
                         img_size=28, num_classes=4, **kwargs)  # 2 x 2 grid
    assert torch.equal(model.reg_token, dinov2.reg_token) and model.pos_embed.shape == (1, 4, 32)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, dinov2.blocks[0].mlp.fc1.weight)


def test_a_saved_model_is_a_checkpoint_that_carries_its_build_arguments(tmp_path):
    path = save_model(tiny_vit(num_classes=5), tmp_path / "m.pt")
    model = create_model("vit_tiny_patch16_224", checkpoint=path, num_classes=3)  # img_size etc. from the file
    assert model.patch_embed.img_size == (32, 32) and len(model.blocks) == 3 and model.head.out_features == 3


def test_at_resolution_is_an_independent_copy():
    from convheads.engine.training import TrainSettings, train
    model = tiny_vit(dynamic_img_size=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = convheads.at_resolution(model, 48)
    x = torch.randn(4, 3, 48, 48)
    torch.testing.assert_close(copy(x), model(x))
    train(copy, [(x, torch.tensor([0, 1, 2, 3]))], TrainSettings(epochs=1, lr=0.1, warmup_epochs=0), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.equal(copy.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
