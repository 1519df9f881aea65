"""timm models in and out: build (pretrained, local checkpoint or random), save and load.

A model is named as timm names it: an architecture (`vit_small_patch14_dinov2`), the same with a
pretrained tag (`vit_small_patch14_dinov2.lvd142m`: which weights and preprocessing), or a Hugging
Face Hub id (`hf-hub:timm/vit_large_patch14_dinov2.lvd142m`). A saved file holds the timm name and
build arguments, the preprocessing the model expects, the replacement structure and the state
dict, so `load_model` rebuilds exactly the saved model (same outputs) without the code that made
it, and without network access.
"""
import difflib
import functools
import os
import socket
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import urlparse

import timm
import torch
from timm.layers import LayerScale, resample_abs_pos_embed
from timm.models import is_model, split_model_name_tag
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from .errors import ConvHeadsError
from .files import save_torch
from .segmentation import SegmentationModel
from .selection import Selection
from .surgery import replace_heads, replacement_config
from .vit import as_vit, vit_info

FORMAT = "convheads-model"
FORMAT_VERSION = 2  # 2: a replaced layer's mixing parameters live in its `mixer` (mixers.py)
HUB = "hf-hub:"
# What a model's pretrained_cfg says about its input (timm.data.resolve_data_config reads these):
# saved with the model so a rebuilt one is fed the same way.
PREPROCESSING = ("interpolation", "crop_pct", "crop_mode", "mean", "std")
PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=None)
def _pretrained_names() -> Tuple[str, ...]:
    return tuple(timm.list_models(pretrained=True))


def check_name(name: str) -> None:
    """Raise a ConvHeadsError unless timm knows `name` (an architecture, `arch.tag` or an hf-hub id)."""
    if name.startswith(HUB):
        if "/" not in name[len(HUB):]:
            raise ConvHeadsError(f"{name!r} is not a Hugging Face Hub id; write hf-hub:<org>/<repo>, "
                                 f"e.g. hf-hub:timm/vit_large_patch14_dinov2.lvd142m")
        return
    arch, tag = split_model_name_tag(name)
    if not is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise ConvHeadsError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if tag and name not in _pretrained_names():
        tags = [n.split(".", 1)[1] for n in _pretrained_names() if n.split(".", 1)[0] == arch]
        raise ConvHeadsError(f"timm has no pretrained tag {tag!r} for {arch}; "
                             + (f"its tags: {', '.join(tags)}" if tags else "it has no pretrained weights"))


@functools.lru_cache(maxsize=None)
def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _weights_source(name: str) -> Tuple[str, str]:
    """('hub', repo id) or ('url', url): where timm downloads `name`'s weights (or hub config) from."""
    if name.startswith(HUB):
        return "hub", name[len(HUB):]
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConvHeadsError(f"timm has no pretrained weights for {name}; use pretrained=False or a local checkpoint")
    return ("hub", cfg.hf_hub_id) if cfg.hf_hub_id else ("url", cfg.url)


def _offline_reason(kind: str, location: str) -> Optional[str]:
    """Why weights from this source cannot be downloaded now, or None if they can.

    A short connection probe replaces huggingface_hub's minute of retries; when it fails, the hub
    is switched to offline mode, so what is in the local cache still loads."""
    import huggingface_hub.constants as hub

    if kind == "hub" and hub.HF_HUB_OFFLINE:
        return "offline (HF_HUB_OFFLINE is set)"
    url = urlparse(hub.ENDPOINT if kind == "hub" else location)
    if _reachable(url.hostname or "", url.port or (443 if url.scheme == "https" else 80)):
        return None
    if kind == "hub":
        hub.HF_HUB_OFFLINE = True
    return f"offline ({url.hostname} cannot be reached)"


def _cached(kind: str, location: str, filenames: Tuple[str, ...]) -> bool:
    if kind == "url":
        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(location).path)).is_file()
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = location.partition("@")
    return any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in filenames)


def check_pretrained(name: str, weights: bool = True) -> None:
    """Raise a clear ConvHeadsError, in seconds, if `name`'s pretrained weights (weights=True) or
    its hub configuration cannot be had: offline and not in the local cache."""
    kind, location = _weights_source(name)
    reason = _offline_reason(kind, location)
    if reason is None:
        return
    cfg = None if name.startswith(HUB) else timm.models.get_pretrained_cfg(name)
    own = [cfg.hf_hub_filename] if cfg is not None and cfg.hf_hub_filename else []
    files = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", *own) if weights \
        else ("config.json",)
    if _cached(kind, location, files):
        return
    what = "pretrained weights" if weights else "configuration"
    where = (f"the Hugging Face cache ({_hub_cache()})" if kind == "hub"
             else f"the torch hub cache ({torch.hub.get_dir()})")
    raise ConvHeadsError(
        f"{reason}: cannot download the {what} of {name}, and they are not in {where}. On a machine with "
        f"network access run python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy "
        f"that cache here (or set HF_HOME to a copy), or save the weights to a file and pass it as a local "
        f"checkpoint (model.checkpoint=...)" + ("" if weights else ", naming the architecture instead of the hub id"))


def _hub_cache() -> str:
    import huggingface_hub.constants as hub
    return hub.HF_HUB_CACHE


def create_model(name: str, pretrained: bool = False, checkpoint: Optional[Union[str, Path]] = None,
                 device: str = "cpu", **kwargs) -> nn.Module:
    """A timm ViT by name, with timm's pretrained weights, a local checkpoint's, or random weights.

    name: `arch`, `arch.tag` or `hf-hub:org/repo` (see the module docstring). kwargs go to
    timm.create_model (img_size, patch_size, num_classes, ...). The build arguments are kept on the
    model (`model.convheads_spec`) so `save_model` can record how to rebuild it. A checkpoint is a
    state dict (timm's, or an original DINOv2 one: converted and its position embedding resampled
    to the model's grid, as timm does for pretrained weights) or a file written by `save_model`,
    whose build arguments are then the defaults for kwargs. A checkpoint whose classifier has
    another number of classes loads without it (the new classifier keeps its fresh init).
    device="meta" builds the structure alone (no memory, no init): a cheap way to check a configuration.
    """
    check_name(name)
    pretrained = pretrained and checkpoint is None
    state = None
    if checkpoint is not None:
        payload = _read(checkpoint)
        kwargs = {**_saved_kwargs(payload), **kwargs}
        state = _state_dict_of(payload, checkpoint)
    if pretrained:
        check_pretrained(name)
    elif name.startswith(HUB):
        check_pretrained(name, weights=False)
    try:
        model = timm.create_model(name, pretrained=pretrained, device=device, **kwargs)
    except TypeError as e:
        raise ConvHeadsError(f"timm cannot build {name} with arguments {kwargs}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- hub/network errors come in many types
        if not (pretrained or name.startswith(HUB)):
            raise
        raise ConvHeadsError(f"could not get the pretrained weights of {name} ({type(e).__name__}: {e}); "
                             f"check the network, or pass a local checkpoint file") from None
    info = vit_info(model)
    for size, patch in zip(info.img_size, info.patch_size):
        if size % patch:
            raise ConvHeadsError(f"img_size {info.img_size} is not divisible by patch_size {info.patch_size}")
    model.convheads_spec = _spec(model, name, kwargs)
    if name.startswith(HUB):  # rebuilt from its architecture if it can be: loading needs no network then
        try:
            model.convheads_spec = recover_spec(model)
        except ConvHeadsError:
            pass
    if state is not None:
        state = check_state_dict(model, state, str(checkpoint), new_classifier=True)
        if device != "meta":  # on meta, checking that it fits is the point
            _assign(model, state)
    return model


def create_segmentation_model(name: str, num_classes: int, feature_blocks: Optional[List[int]] = None,
                              pretrained: bool = False, checkpoint: Optional[Union[str, Path]] = None,
                              device: str = "cpu", **kwargs) -> SegmentationModel:
    """A timm ViT backbone (as `create_model` builds it, without its classifier) with a linear
    segmentation head on the patch tokens of `feature_blocks` (None: the last block), see
    convheads.segmentation. A checkpoint's classifier, if it has one, is left out."""
    backbone = create_model(name, pretrained=pretrained, checkpoint=checkpoint, device=device,
                            **{**kwargs, "num_classes": 0})
    return SegmentationModel(backbone, num_classes, feature_blocks).to(device)


def _spec(model: nn.Module, name: str, kwargs: dict) -> dict:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {"name": name, "kwargs": dict(kwargs), "pretrained_cfg": {k: cfg[k] for k in PREPROCESSING if k in cfg}}


def _read(path: Union[str, Path]):
    path = Path(path)
    if not path.is_file():
        raise ConvHeadsError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for unreadable files
        raise ConvHeadsError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _saved_kwargs(payload) -> dict:
    """The build arguments a file written by save_model carries (none for a plain state dict)."""
    return dict(payload["spec"]["kwargs"]) if isinstance(payload, dict) and payload.get("format") == FORMAT else {}


def _state_dict_of(payload, path) -> dict:
    """The state dict in a checkpoint: plain, under 'state_dict' / 'model', or a save_model file's."""
    state = payload
    if isinstance(state, dict) and state.get("format") == FORMAT:
        if state["replacement"]:
            raise ConvHeadsError(f"{path} holds a model with replaced heads; load it with convheads.load_model")
        state = state["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConvHeadsError(f"{path} does not hold a state dict")
    return state


def read_state_dict(path: Union[str, Path]) -> dict:
    """The state dict in a checkpoint file: plain, or under 'state_dict' / 'model'."""
    return _state_dict_of(_read(path), path)


def check_state_dict(model: nn.Module, state: dict, source: str, new_classifier: bool = False) -> dict:
    """Raise, naming the keys, unless `state` fits `model`; return what to load.

    Checkpoints in other layouts timm converts for ViTs (original DINOv2, OpenCLIP, ...) are
    converted first, and a position embedding for another patch grid is resampled to the model's.
    new_classifier: classifier weights whose shape differs, or that a backbone checkpoint (DINOv2's) lacks,
    are not an error; the model keeps its own.
    """
    own = model.state_dict()
    if set(state) != set(own) or any(getattr(state[k], "shape", None) != own[k].shape for k in own):
        try:
            state = checkpoint_filter_fn(dict(state), model)
        except Exception:  # noqa: BLE001 -- not a layout timm knows: the check below names the keys
            pass
    if new_classifier:
        heads = model.pretrained_cfg.get("classifier", "head")
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,)
        state = {k: own[k] if k.startswith(heads) and k in own and getattr(v, "shape", None) != own[k].shape else v
                 for k, v in state.items()}
        state.update({k: v for k, v in own.items() if k.startswith(heads) and k not in state})  # a backbone's
        state = {k: v for k, v in state.items() if k in own or not k.startswith(heads)}  # a model without one
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches (file vs model)", wrong)) if keys]
        raise ConvHeadsError(f"the checkpoint {source} does not fit the model ({'; '.join(parts)}); "
                             f"check the model name and its img_size / patch_size / num_classes")
    return state


def load_checkpoint(model: nn.Module, path: Union[str, Path], new_classifier: bool = False) -> None:
    """Load a checkpoint file's state dict into `model`, strictly (see check_state_dict)."""
    _assign(model, check_state_dict(model, read_state_dict(path), str(path), new_classifier))


def _assign(model: nn.Module, state: dict) -> None:
    # assign=True materialises a model built on the meta device (and is harmless otherwise)
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in model.state_dict(keep_vars=True).values()):
        raise ConvHeadsError("part of the model was left uninitialised (built on the meta device)")


# What can be read back from a built timm VisionTransformer, as timm.create_model arguments.
def _observed(model: nn.Module) -> Dict[str, object]:
    info, block = vit_info(model), model.blocks[0]
    # attention details from an unreplaced block if there is one (replacement keeps the MLPs)
    attn = next((b.attn for b in model.blocks if isinstance(getattr(b.attn, "qkv", None), nn.Linear)), block.attn)
    drop_path = getattr(model.blocks[-1], "drop_path1", None)
    observed = {
        "img_size": info.img_size, "patch_size": info.patch_size, "num_classes": model.num_classes,
        "global_pool": model.global_pool, "embed_dim": model.embed_dim, "depth": info.depth,
        "num_heads": info.num_heads, "class_token": model.cls_token is not None,
        "reg_tokens": model.num_reg_tokens, "no_embed_class": model.no_embed_class,
        "dynamic_img_size": info.dynamic_img_size,
        "dynamic_img_pad": bool(getattr(model.patch_embed, "dynamic_img_pad", False)),
        "drop_rate": model.head_drop.p, "pos_drop_rate": model.pos_drop.p,
        "drop_path_rate": float(getattr(drop_path, "drop_prob", 0.0)),
        "proj_drop_rate": getattr(getattr(attn, "proj_drop", None), "p", None),
        "attn_drop_rate": getattr(getattr(attn, "attn_drop", None), "p", None),
    }
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    if isinstance(fc1, nn.Linear) and type(block.mlp).__name__ == "Mlp":
        observed["mlp_ratio"] = fc1.out_features / model.embed_dim
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        observed["qkv_bias"] = qkv.bias is not None
    if hasattr(attn, "q_norm"):
        observed["qk_norm"] = not isinstance(attn.q_norm, nn.Identity)
    for arg, module in (("pre_norm", model.norm_pre), ("fc_norm", model.fc_norm)):
        observed[arg] = not isinstance(module, nn.Identity)
    # LayerScale's init value is overwritten by the weights; only whether there is one matters
    observed["init_values"] = 1e-5 if isinstance(getattr(block, "ls1", None), LayerScale) else None
    return {k: v for k, v in observed.items() if v is not None or k == "init_values"}


def recover_spec(model: nn.Module) -> dict:
    """A build spec for a ViT made without `create_model` (e.g. by `timm.create_model`).

    The architecture comes from `model.pretrained_cfg`; the arguments that can be read back from
    the modules (image and patch size, classes, pooling, width, depth, heads, prefix tokens, MLP
    ratio, dropout rates, ...) are compared with the architecture's defaults. The spec is used only
    if timm rebuilds the same structure from it; what cannot be read back (another norm or
    activation layer, a custom block) makes it fail, naming the first difference.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch or not is_model(arch):
        raise ConvHeadsError("the model carries no build spec and no timm architecture (pretrained_cfg); "
                             "create it with convheads.create_model(name, ...) so it can be rebuilt")
    name = f"{arch}.{cfg['tag']}" if cfg.get("tag") and f"{arch}.{cfg['tag']}" in _pretrained_names() else arch
    base = _observed(timm.create_model(name, device="meta"))
    kwargs = {k: v for k, v in _observed(model).items() if base.get(k) != v}
    spec = {"name": name, "kwargs": kwargs, "pretrained_cfg": {k: cfg[k] for k in PREPROCESSING if k in cfg}}
    rebuilt = _build(spec, replacement_config(model))
    ours, theirs = _structure(model), _structure(rebuilt)
    if ours != theirs:
        first = next((a, b) for a, b in zip(ours + [""], theirs + [""]) if a != b)
        raise ConvHeadsError(f"cannot tell how this {arch} was built: timm.create_model('{name}', **{kwargs}) differs "
                             f"in '{first[0].strip()}' (rebuilt: '{first[1].strip()}'); create it with "
                             f"convheads.create_model(name, ...) so it can be rebuilt")
    return spec


def _structure(model: nn.Module) -> List[str]:
    return repr(model).splitlines()


def build_spec(model: nn.Module) -> dict:
    """How to rebuild `model`: what create_model recorded, else what `recover_spec` reads back."""
    spec = getattr(model, "convheads_spec", None)
    return spec if spec is not None else recover_spec(model)


def save_model(model: nn.Module, path: Union[str, Path]) -> Path:
    """Save a (possibly replaced) timm ViT, or a segmentation model on one, so that `load_model` rebuilds it."""
    spec = build_spec(as_vit(model))
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "spec": spec,
               "replacement": replacement_config(model),
               "segmentation": model.config if isinstance(model, SegmentationModel) else None,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    return save_torch(payload, path)


def load_model(path: Union[str, Path]) -> nn.Module:
    """Rebuild a model saved by `save_model` (on the CPU, in eval mode).

    A folded ensemble layer is saved folded (its state dict has the folded projections) and is
    rebuilt folded; an unfolded one comes back unfolded, ready to train on.
    """
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConvHeadsError(f"{path} is not a convheads model file (save one with convheads.save_model)")
    if payload["version"] != FORMAT_VERSION:
        newer = payload["version"] > FORMAT_VERSION
        raise ConvHeadsError(f"{path} is a convheads model file of format {payload['version']}, this convheads reads "
                             f"format {FORMAT_VERSION}; " + ("upgrade convheads" if newer else
                                                             "rerun the stage that wrote it (or save it again with the "
                                                             "convheads that wrote it, as ONNX)"))
    return _rebuild(payload["spec"], payload["replacement"], payload["state_dict"], str(path),
                    payload.get("segmentation"))


def _build(spec: dict, replacement: List[dict], segmentation: Optional[dict] = None) -> nn.Module:
    """`spec` built on the meta device, with the replacement replayed and its preprocessing, and
    wrapped in a segmentation head if `segmentation` has its settings."""
    model = create_model(spec["name"], device="meta", **spec["kwargs"])
    model.pretrained_cfg = {**model.pretrained_cfg, **spec.get("pretrained_cfg", {})}
    model.convheads_spec = spec
    info = vit_info(model)
    for entry in replacement:
        replace_heads(model, Selection({entry["block"]: entry["heads"]}, info.depth, info.num_heads),
                      kernel_size=entry["kernel_size"], variant=entry["variant"])
        attn = model.blocks[entry["block"]].attn
        if entry["folded"] and entry["variant"] == "folded":  # in the form it was saved in
            attn.fold(bias_at=entry.get("bias_at") or "output")
        elif entry["folded"]:
            attn.fold()
        attn.mixing = entry["mixing"]
    return SegmentationModel(model, **segmentation) if segmentation else model


def _rebuild(spec: dict, replacement: List[dict], state: dict, source: str,
             segmentation: Optional[dict] = None) -> nn.Module:
    """Build `spec` on the meta device, replay the replacement, then load `state` into it."""
    model = _build(spec, replacement, segmentation)
    _assign(model, check_state_dict(model, state, source))
    return model.eval()


def at_resolution(model: nn.Module, img_size: Union[int, Tuple[int, int]]) -> nn.Module:
    """An independent copy of a timm ViT (replaced or not) built for `img_size` with a fixed grid.

    The position embedding is resampled to the new patch grid the way timm does when it loads
    weights at another size (bicubic), and frozen there (dynamic_img_size=False); every other
    weight is copied. This is how to export or deploy at one resolution.
    """
    vit = as_vit(model)
    spec = build_spec(vit)
    info = vit_info(model)
    size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    grid = info.patch_grid(*size)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    key = "pos_embed" if vit is model else "backbone.pos_embed"
    if getattr(vit, "pos_embed", None) is not None:
        state[key] = resample_abs_pos_embed(
            state[key], new_size=grid, old_size=info.grid_size,
            num_prefix_tokens=0 if vit.no_embed_class else info.num_prefix_tokens)
    new_spec = {**spec, "kwargs": {**spec["kwargs"], "img_size": size, "dynamic_img_size": False}}
    return _rebuild(new_spec, replacement_config(model), state, "the model",
                    model.config if isinstance(model, SegmentationModel) else None)
