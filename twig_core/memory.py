"""Device memory a run needs beyond the weights, from the latent shape: what a host's memory manager should keep
free before it starts (ComfyUI's ``load_models_gpu(memory_required=...)``), so it unloads or streams enough
weights instead of letting the driver spill to system memory.

Upper estimates of the largest live activations, not measurements: a sampling step (one transformer call, both
CFG halves) and a DC-AE decode or encode (the full-resolution stage of one image or one tile).
"""

from __future__ import annotations

from .ops import FFN_CHUNK

# live tensors at once at the DC-AE's full-resolution stage: input, two convolution outputs, the norm's and the
# residual's temporaries
_VAE_LIVE = 5


def step_bytes(config, latent_shape, itemsize: int, cfg: bool = True, caption_tokens: int = 300) -> int:
    """Activations of one transformer call on a latent [B,C,h,w] (twice the batch with ``cfg``), computing in
    a dtype of ``itemsize`` bytes: the linear attention's q, k, v and output in fp32, the residual stream and
    its normalised copies, one Mix-FFN chunk's value, gate and depthwise temporaries, and the cross-attention
    scores over ``caption_tokens``."""
    b, _, h, w = latent_shape
    p = config.patch_size
    tokens = b * (2 if cfg else 1) * (h // p) * (w // p)
    d, chunk = config.width, min(config.mlp_hidden, FFN_CHUNK)
    per_token = 4 * 4 * d + itemsize * (8 * d + 3 * chunk + config.cross_heads * caption_tokens)
    return int(tokens * per_token)


def vae_bytes(latent_shape, itemsize: int, channels: int, spatial_factor: int = 32, tile: int | None = None) -> int:
    """Activations of a DC-AE decode (or encode) of a latent [B,C,h,w] in tiles of ``tile`` latent px (None:
    untiled), computing in a dtype of ``itemsize`` bytes; ``channels`` is the full-resolution stage's width. A
    tile counts with a quarter tile more on each axis (dcae_exec's default overlap, which also covers the halo
    of its exact tiles)."""
    b, _, h, w = latent_shape
    grown = tile + tile // 4 if tile else None
    th, tw = (min(h, grown), min(w, grown)) if tile else (h, w)
    pixels = th * spatial_factor * tw * spatial_factor
    return int(b * pixels * channels * itemsize * _VAE_LIVE)
