"""Filling a model built on the meta device from a weight mapping, checked first.

Models are built on the meta device and every parameter is assigned from the file, so no random
initialisation happens and the weights exist once: stored dtype by default (a file with mixed float dtypes is
unified to its dominant one), or converted tensor by tensor. Every key and shape is checked before any tensor
is read: a wrong, truncated or corrupt file gives one TwigError naming the file and the first offending
keys/shapes, never a half-loaded model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from .errors import TwigError
from .quant import QTensor, attach, keeps_quantized
from .weights import shortlist

def check_keys(model: nn.Module, got: Mapping[str, torch.Tensor], label: str, what: str, hint: str = ""):
    """TwigError naming the missing, unexpected and mis-shaped tensors of ``got`` (meta tensors do)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [f"{k} {tuple(got[k].shape)} in the file vs {want[k]} in the model"
                  for k in want if k in got and tuple(got[k].shape) != want[k]]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({shortlist(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors ({shortlist(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({shortlist(mismatched, 3)})")
        raise TwigError(f"{label}: does not match the {what} inferred from it: " + "; ".join(parts) + hint)


def dominant_dtype(metas: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The float dtype holding the most bytes (fp32 when there are no float tensors)."""
    total: dict[torch.dtype, int] = {}
    for t in metas.values():
        if t.is_floating_point():
            total[t.dtype] = total.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(total, key=total.get) if total else torch.float32


def assign(model: nn.Module, tensors, names, dtype: torch.dtype, device, label: str, pop: bool = False,
           check: bool = True):
    """Assign every parameter/buffer of a meta-device model from ``tensors`` (read one at a time)."""
    device = torch.device(device)
    for name in names:
        try:
            t = tensors.pop(name) if pop else tensors[name]
        except TwigError:
            raise
        except Exception as e:  # e.g. an I/O error on a network drive
            raise TwigError(f"{label}: cannot read tensor {name!r}: {e}") from None
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if isinstance(t, QTensor):  # GGUF blocks or fp8: kept narrow in their layer
            attach(mod, leaf, t, dtype, device)
            continue
        t = _cast(t, dtype).to(device)
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
        else:
            mod._buffers[leaf] = t
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if check and left:
        raise TwigError(f"{label}: tensors left unloaded: {shortlist(left)}")  # pragma: no cover


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def widened(model: nn.Module, name: str, t, dtype: torch.dtype) -> torch.Tensor:
    """The weight ``name`` of a meta-device ``model`` as ``assign`` would give it from ``t`` (same ``dtype``),
    as a plain tensor on the CPU: floats in ``dtype``; a quantized one widened as its layer gives it
    (``dequantized(fp32)`` where ``attach`` keeps it quantized, else ``dtype``). What a converter reads."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(t, QTensor):
        return t.dequantize(torch.float32 if keeps_quantized(mod, leaf, t) else dtype)
    return _cast(t, dtype)


@contextlib.contextmanager
def named_errors(label: str):
    """Re-raise TwigErrors from shape inference with the file name in front."""
    try:
        yield
    except TwigError as exc:
        if label in str(exc):
            raise
        raise TwigError(f"{label}: {exc}") from None
