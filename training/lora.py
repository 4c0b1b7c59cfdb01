"""Low-rank adapters (LoRA) for fine-tuning a Twig transformer: ``apply_lora`` makes each chosen weight
``W + (alpha / rank) * up @ down`` with ``W`` frozen and only ``down`` / ``up`` trainable.

The adapter sits on the weight itself (a parametrization), not around a module's forward, because the
transformer's layers read their weights directly (the attention slices ``qkv.weight``, Mix-FFN hands its conv
weights to one fused routine). ``merge_lora`` folds the adapters in and leaves plain weights with the original
names, so a merged model saves and loads like any checkpoint; ``lora_state_dict`` / ``load_lora`` keep the
adapters alone (a few MB) to ship or apply later.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from twig_core.errors import TwigError


class LoRADelta(nn.Module):
    """The parametrization: original weight [out, in(, 1, 1)] -> weight + scale * up @ down."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out, inn = weight.shape[0], weight.shape[1]
        self.scale = alpha / rank
        self.down = nn.Parameter(torch.randn(rank, inn, device=weight.device) / math.sqrt(inn))
        self.up = nn.Parameter(torch.zeros(out, rank, device=weight.device))  # starts as the identity change

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(weight.dtype, self.up.dtype)
        delta = (self.scale * self.up @ self.down).reshape(weight.shape)
        return weight.to(dt) + delta.to(dt)


def lora_targets(model: nn.Module, prefix: str = "blocks.") -> list[str]:
    """Names of the modules under ``prefix`` whose weight is a matrix: linear layers and 1x1 convolutions
    (attention projections, the caption cross-attention, Mix-FFN's expand and project; not the depthwise 3x3)."""
    names = []
    for name, m in model.named_modules():
        if not name.startswith(prefix):
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1):
            names.append(name)
    return names


def apply_lora(model: nn.Module, rank: int = 16, alpha: float | None = None, prefix: str = "blocks.") -> list:
    """Freeze ``model`` and put a rank-``rank`` adapter on every ``lora_targets`` weight; returns the adapters'
    parameters (for ``train_dit(..., params=...)``). ``alpha`` defaults to ``rank`` (scale 1)."""
    if rank < 1:
        raise TwigError(f"LoRA rank must be at least 1, got {rank}")
    targets = lora_targets(model, prefix)
    if not targets:
        raise TwigError(f"no linear or 1x1 convolution weights under '{prefix}' to adapt")
    model.requires_grad_(False)
    params = []
    for name in targets:
        m = model.get_submodule(name)
        params += _attach(m, name, LoRADelta(m.weight, rank, float(alpha if alpha is not None else rank)))
    return params


def _attach(m: nn.Module, name: str, delta: LoRADelta) -> list:
    """Put ``delta`` on module ``m``'s weight (one adapter per weight); returns its two parameters."""
    if parametrize.is_parametrized(m, "weight"):
        raise TwigError(f"{name} already carries an adapter")
    parametrize.register_parametrization(m, "weight", delta)
    return [delta.down, delta.up]


def _adapted(model: nn.Module):
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            yield name, m, m.parametrizations.weight


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (kept in the weight's stored dtype) and remove the adapters."""
    for _, m, plist in list(_adapted(model)):
        dtype = plist.original.dtype
        with torch.no_grad():
            merged = m.weight.to(dtype)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        with torch.no_grad():
            m.weight.copy_(merged)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: ``<module>.lora_down`` [rank, in] and ``<module>.lora_up`` [out, rank], plus each
    one's scale as ``<module>.lora_scale``."""
    out = {}
    for name, _, plist in _adapted(model):
        delta = plist[0]
        out[f"{name}.lora_down"] = delta.down.detach().clone()
        out[f"{name}.lora_up"] = delta.up.detach().clone()
        out[f"{name}.lora_scale"] = torch.tensor(delta.scale)
    return out


def load_lora(model: nn.Module, state: dict[str, torch.Tensor], source: str = "LoRA weights") -> list:
    """Put the adapters of ``state`` (``lora_state_dict``'s form) on ``model``; returns their parameters."""
    names = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".lora_down")})
    if not names:
        raise TwigError(f"{source}: no '.lora_down' tensors")
    params = []
    model.requires_grad_(False)
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise TwigError(f"{source}: the model has no layer '{name}'") from None
        down, up = state[f"{name}.lora_down"], state.get(f"{name}.lora_up")
        if up is None or up.shape[1] != down.shape[0] or (up.shape[0], down.shape[1]) != tuple(m.weight.shape[:2]):
            raise TwigError(f"{source}: adapter '{name}' does not fit its weight {tuple(m.weight.shape)}")
        scale = float(state[f"{name}.lora_scale"]) if f"{name}.lora_scale" in state else 1.0
        delta = LoRADelta(m.weight, down.shape[0], scale * down.shape[0])
        with torch.no_grad():
            delta.down.copy_(down)
            delta.up.copy_(up)
        params += _attach(m, name, delta)
    return params


def peft_state_dict(model: nn.Module, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """The adapters in the diffusers/PEFT layout that ``SanaPipeline.load_lora_weights`` reads
    (``transformer.<diffusers module>.lora_A.weight`` [rank, in(, 1, 1)] / ``lora_B.weight`` [out, rank(, 1, 1)]),
    named through the transformer key table: an adapter on the fused ``attn.qkv`` (``cross_attn.kv_linear``) is
    written as one per ``to_q``/``to_k``/``to_v`` sharing ``lora_A``, each with its slice of ``lora_B``. The scale
    is folded into ``lora_B``, so the file needs no ``alpha`` (a reader's default alpha = rank is exact)."""
    from twig_core.keymap import ours_to_diffusers

    out = {}
    for name, m, plist in _adapted(model):
        delta = plist[0]
        down, up = delta.down.detach(), (delta.scale * delta.up).detach()
        if plist.original.ndim == 4:  # a 1x1 convolution: PEFT's adapter is two 1x1 convolutions
            down, up = down[..., None, None], up[..., None, None]
        for theirs, part in ours_to_diffusers({f"{name}.weight": up}).items():
            module = theirs[: -len(".weight")]
            out[f"{prefix}{module}.lora_A.weight"] = down.clone().contiguous()
            out[f"{prefix}{module}.lora_B.weight"] = part.clone().contiguous()
    return out
