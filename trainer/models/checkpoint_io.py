"""Backbone weights in the released DINOv2 layout: export, save, read and load.

The released layout is a flat dict of tensors with the backbone's own parameter names (``cls_token``,
``blocks.{i}.attn.qkv.weight``, ...). The loader also accepts what training checkpoints look like:

- blocks wrapped in FSDP chunks, ``blocks.{chunk}.{i}.*`` (the reference's ``BlockChunk``, where ``i`` is already the
  global block index), mapped to ``blocks.{i}.*``;
- a prefix in front of every key (``backbone.``, ``teacher.backbone.``, ``student.backbone.``, ``module.``, ...),
  found from where ``cls_token`` sits; when both student and teacher are present the teacher wins (the released
  backbones are teachers);
- wrapper names inserted by ``torch.compile`` / activation checkpointing / FSDP1 (``_orig_mod.``, ...);
- a position embedding for another grid (e.g. a 518 px release into a 224 px model), resampled with the model's
  own interpolation settings.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import torch
import torch.nn as nn

from trainer.models.vision_transformer import interpolate_pos_embed

__all__ = [
    "LoadResult",
    "export_backbone_state_dict",
    "load_backbone_state_dict",
    "normalize_keys",
    "read_checkpoint",
    "save_backbone",
]

logger = logging.getLogger(__name__)

_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_SUFFIXES = (".safetensors", ".pth", ".pt")
_NESTED_KEYS = ("teacher", "model", "state_dict", "student")  # where training checkpoints keep the weights


class LoadResult(NamedTuple):
    """Keys the model had but the checkpoint lacked, and checkpoint keys the model has no parameter for."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _strip_wrappers(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def export_backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights in the released layout: contiguous CPU tensors owned by the result.

    Sharded (FSDP2 ``DTensor``) parameters are gathered with ``full_tensor()``, a collective: call this on every
    rank, then write from one.
    """
    exported = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor; checked by attribute so no torch.distributed import is needed
            tensor = tensor.full_tensor()
        exported[_strip_wrappers(name)] = tensor.to("cpu", copy=True).contiguous()
    return exported


def save_backbone(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write :func:`export_backbone_state_dict` to ``path``: safetensors for ``.safetensors``, ``torch.save`` for
    ``.pth``/``.pt``. The file appears atomically (written beside it, then renamed). Returns the path."""
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"checkpoint path {str(path)!r}: suffix {path.suffix!r} is not one of {', '.join(_SUFFIXES)}")
    state_dict = export_backbone_state_dict(model)
    partial = path.with_name(path.name + ".partial")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file  # noqa: PLC0415 - only needed for this format

        save_file(state_dict, str(partial), metadata={"format": "pt"})
    else:
        torch.save(state_dict, partial)
    os.replace(partial, path)
    logger.info("saved backbone (%d tensors) to %s", len(state_dict), path)
    return path


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt`` file onto the CPU, unwrapping ``{"teacher"|"model"|...: {...}}``.

    ``path`` is a local path or an fsspec URI (s3://, gs://: the object is read into memory whole)."""
    if "://" in str(path) and not str(path).startswith("file://"):
        return _read_remote_checkpoint(str(path))
    path = Path(str(path).removeprefix("file://"))
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path), device="cpu")
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"checkpoint path {str(path)!r}: suffix {path.suffix!r} is not one of {', '.join(_SUFFIXES)}")
    return _find_tensors(torch.load(path, map_location="cpu", weights_only=True), str(path))


def _read_remote_checkpoint(uri: str) -> dict[str, torch.Tensor]:
    suffix = "." + uri.rsplit(".", 1)[-1] if "." in uri.rsplit("/", 1)[-1] else ""
    if suffix not in _SUFFIXES:
        raise ValueError(f"checkpoint path {uri!r}: suffix {suffix!r} is not one of {', '.join(_SUFFIXES)}")
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.isfile(root):
        raise FileNotFoundError(f"backbone checkpoint {uri!r} does not exist")
    data = fs.cat_file(root)
    if suffix == ".safetensors":
        from safetensors.torch import load  # noqa: PLC0415

        return load(data)
    return _find_tensors(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), uri)


def _find_tensors(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if any(isinstance(value, torch.Tensor) for value in obj.values()):
            return dict(obj)
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _find_tensors(obj[key], f"{where}[{key!r}]")
    raise ValueError(f"{where}: no state dict found (expected tensors, or one under {', '.join(_NESTED_KEYS)})")


def _backbone_prefix(keys: list[str], prefix: str | None) -> str:
    if prefix is not None:
        return prefix
    candidates = sorted({key[: -len("cls_token")] for key in keys if key.endswith("cls_token")})
    teachers = [c for c in candidates if "teacher" in c]
    if len(candidates) == 1:
        return candidates[0]
    if len(teachers) == 1:
        return teachers[0]
    if not candidates:
        raise ValueError("checkpoint has no cls_token key, so it holds no DINOv2 backbone")
    raise ValueError(f"checkpoint holds several backbones (prefixes {candidates}); pass prefix= to choose one")


def normalize_keys(state_dict: Mapping[str, torch.Tensor], *, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Released-layout keys: wrapper names removed, backbone prefix removed (keys outside it dropped), blocks flat."""
    stripped = {_strip_wrappers(key): value for key, value in state_dict.items()}
    chosen = _backbone_prefix(list(stripped), prefix)
    out = {}
    for key, value in stripped.items():
        if key.startswith(chosen):
            out[_CHUNKED_BLOCK.sub(r"blocks.\1.", key[len(chosen) :])] = value
    return out


def _fit_pos_embed(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    source, target = state_dict.get("pos_embed"), model.pos_embed
    if source is None or source.shape == target.shape:
        return
    grid = model.grid_size
    config = model.config
    logger.info(
        "interpolating checkpoint pos_embed %s to the model's %dx%d grid %s (bicubic, antialias=%s, offset=%s)",
        tuple(source.shape), grid, grid, tuple(target.shape), config.interpolate_antialias, config.interpolate_offset,
    )
    state_dict["pos_embed"] = interpolate_pos_embed(
        source, (grid, grid), antialias=config.interpolate_antialias, offset=config.interpolate_offset
    )


def _check_keys(model_sd: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], strict: bool) -> LoadResult:
    missing = [key for key in model_sd if key not in state_dict]
    unexpected = [key for key in state_dict if key not in model_sd]
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(model_sd[key].shape)}"
        for key, value in state_dict.items()
        if key in model_sd and value.shape != model_sd[key].shape
    ]
    problems = [f"shape mismatch: {'; '.join(mismatched)}"] if mismatched else []
    if strict and missing:
        problems.append(f"{len(missing)} missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if strict and unexpected:
        problems.append(
            f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if "register_tokens" in unexpected or "register_tokens" in missing:
        problems.append("hint: model.num_register_tokens must match the checkpoint's register_tokens (0 or 4)")
    if problems and (mismatched or strict):
        raise ValueError("backbone checkpoint does not fit the model: " + " | ".join(problems))
    return LoadResult(missing, unexpected)


def load_backbone_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True, prefix: str | None = None
) -> LoadResult:
    """Load released-layout (flat or chunked, optionally prefixed) weights into a materialised backbone.

    Args:
        model: a :class:`~trainer.models.DinoVisionTransformer` (not on the meta device, not yet sharded).
        state_dict: tensors as read by :func:`read_checkpoint`.
        strict: raise on missing or unexpected keys (shape mismatches always raise, except ``pos_embed``,
            which is interpolated to the model's grid).
        prefix: the backbone's key prefix; found from ``cls_token`` when None.
    """
    if any(param.is_meta for param in model.parameters()):
        raise ValueError("cannot load weights into a model on the meta device; call to_empty() first")
    normalized = normalize_keys(state_dict, prefix=prefix)
    _fit_pos_embed(model, normalized)
    result = _check_keys(model.state_dict(), normalized, strict)
    model.load_state_dict(normalized, strict=False)  # keys were checked above, with clearer messages
    logger.info("loaded backbone weights (%d tensors)", len(normalized) - len(result.unexpected_keys))
    return result
