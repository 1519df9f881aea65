"""timm models in and out: build (pretrained, local checkpoint or random), save and load.

A saved file holds the timm model name and build arguments, the replacement structure and the
state dict, so `load_model` rebuilds exactly the saved model (same outputs) without the code
that made it.
"""
import difflib
from pathlib import Path
from typing import List, Optional, Tuple, Union

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .errors import ConvHeadsError
from .files import atomic_path
from .selection import Selection
from .surgery import replace_heads, replacement_config
from .vit import vit_info

FORMAT = "convheads-model"
FORMAT_VERSION = 1


def create_model(name: str, pretrained: bool = False, checkpoint: Optional[Union[str, Path]] = None,
                 device: str = "cpu", **kwargs) -> nn.Module:
    """A timm ViT by name, with timm's pretrained weights, a local checkpoint's, or random weights.

    kwargs go to timm.create_model (img_size, patch_size, num_classes, ...). The name and kwargs
    are kept on the model (`model.convheads_spec`) so `save_model` can record how to rebuild it.
    A checkpoint whose classifier has another number of classes loads without it (the new
    classifier keeps its fresh init), as timm does for pretrained weights. device="meta" builds
    the structure alone (no memory, no init): a cheap way to check a configuration.
    """
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConvHeadsError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    pretrained = pretrained and checkpoint is None
    try:
        model = timm.create_model(name, pretrained=pretrained, device=device, **kwargs)
    except TypeError as e:
        raise ConvHeadsError(f"timm cannot build {name} with arguments {kwargs}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- hub/network errors come in many types
        if not pretrained:
            raise
        raise ConvHeadsError(
            f"could not get the pretrained weights of {name} ({type(e).__name__}: {e}). Without network "
            f"access, download them elsewhere and pass a local checkpoint file, or use pretrained=False") from None
    info = vit_info(model)
    for size, patch in zip(info.img_size, info.patch_size):
        if size % patch:
            raise ConvHeadsError(f"img_size {info.img_size} is not divisible by patch_size {info.patch_size}")
    model.convheads_spec = {"name": name, "kwargs": dict(kwargs)}
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, new_classifier=True)
    return model


def _read(path: Union[str, Path]):
    path = Path(path)
    if not path.is_file():
        raise ConvHeadsError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for unreadable files
        raise ConvHeadsError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def read_state_dict(path: Union[str, Path]) -> dict:
    """The state dict in a checkpoint file: plain, or under 'state_dict' / 'model'."""
    state = _read(path)
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


def check_state_dict(model: nn.Module, state: dict, source: str, new_classifier: bool = False) -> dict:
    """Raise, naming the keys, unless `state` fits `model`; return what to load.

    new_classifier: classifier weights whose shape differs are not an error; the model keeps its own.
    """
    own = model.state_dict()
    if new_classifier:
        heads = model.pretrained_cfg.get("classifier", "head")
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,)
        state = {k: own[k] if k.startswith(heads) and k in own and getattr(v, "shape", None) != own[k].shape else v
                 for k, v in state.items()}
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


def _build_spec(model: nn.Module, purpose: str) -> dict:
    """The timm name and kwargs create_model recorded on `model`, needed to rebuild it."""
    spec = getattr(model, "convheads_spec", None)
    if spec is None:
        raise ConvHeadsError("the model carries no build spec; create it with convheads.create_model(name, ...) "
                             f"so it can be rebuilt {purpose}")
    return spec


def save_model(model: nn.Module, path: Union[str, Path]) -> Path:
    """Save a (possibly replaced) model made by `create_model` so that `load_model` rebuilds it."""
    spec = _build_spec(model, "on load")
    vit_info(model)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "spec": spec,
               "replacement": replacement_config(model),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_model(path: Union[str, Path]) -> nn.Module:
    """Rebuild a model saved by `save_model` (on the CPU, in eval mode).

    A folded ensemble layer is saved folded (its state dict has the folded projections) and is
    rebuilt folded; an unfolded one comes back unfolded, ready to train on.
    """
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConvHeadsError(f"{path} is not a convheads model file (save one with convheads.save_model)")
    if payload["version"] > FORMAT_VERSION:
        raise ConvHeadsError(f"{path} was written by a newer convheads (format {payload['version']}); upgrade")
    return _rebuild(payload["spec"], payload["replacement"], payload["state_dict"], str(path))


def _rebuild(spec: dict, replacement: List[dict], state: dict, source: str) -> nn.Module:
    """Build `spec` on the meta device, replay the replacement, then load `state` into it."""
    model = create_model(spec["name"], device="meta", **spec["kwargs"])
    info = vit_info(model)
    for entry in replacement:
        replace_heads(model, Selection({entry["block"]: entry["heads"]}, info.depth, info.num_heads),
                      kernel_size=entry["kernel_size"], variant=entry["variant"])
        if entry["folded"]:
            model.blocks[entry["block"]].attn.fold()
        model.blocks[entry["block"]].attn.mixing = entry.get("mixing", "auto")  # files before it existed: auto
    _assign(model, check_state_dict(model, state, source))
    return model.eval()


def at_resolution(model: nn.Module, img_size: Union[int, Tuple[int, int]]) -> nn.Module:
    """A copy of a `create_model` model (replaced or not) built for `img_size` with a fixed grid.

    The position embedding is resampled to the new patch grid the way timm does when it loads
    weights at another size (bicubic), and frozen there (dynamic_img_size=False); every other
    weight is shared by value. This is how to export or deploy at one resolution.
    """
    spec = _build_spec(model, "at another resolution")
    info = vit_info(model)
    size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    grid = info.patch_grid(*size)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if getattr(model, "pos_embed", None) is not None:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=grid, old_size=info.grid_size,
            num_prefix_tokens=0 if model.no_embed_class else info.num_prefix_tokens)
    new_spec = {"name": spec["name"], "kwargs": {**spec["kwargs"], "img_size": size, "dynamic_img_size": False}}
    return _rebuild(new_spec, replacement_config(model), state, "the model")
