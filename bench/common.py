"""Shared by the benchmarks: memory readings (Linux /proc; falls back to ru_maxrss elsewhere), timing of small
kernels, and the full-size random checkpoints in Twig's published layout (Gemma-2-2B folder, fp16 NVlabs ``.pth``,
DC-AE safetensors)."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time

GEMMA_2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=8192,
    sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, pad_token_id=0,
    eos_token_id=1, bos_token_id=2,
)


def _status_mib(field: str) -> float:
    # VmRSS: resident now; VmHWM: peak resident of this process image (unlike ru_maxrss, not inherited
    # from the parent across fork+exec).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def best_seconds(fn, repeats: int = 3) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def int8_weight(b):
    """``b`` [out, in] as a ``twig_core.int8.Int8Weight`` of a bare layer: what ``int8.dense`` multiplies, packed on
    its first call."""
    from twig_core import int8

    return int8.Int8Weight(argparse.Namespace(weight=b, _twig_int8={}, _twig_smooth={}), lambda: b)


def write_full_size(folder: str, layers: int = 20, gemma_layers: int = 26) -> dict[str, str]:
    """Random full-size checkpoints in ``folder`` (kept if already there), as Twig v0 alpha is published: a
    Gemma-2-2B Hugging Face folder (bf16 safetensors; the tokenizer is the demo model's, since only the
    weights' size matters), the 1600M transformer as an fp16 NVlabs ``.pth`` and the DC-AE f32c32 as fp32
    safetensors. ``layers`` / ``gemma_layers`` build fewer blocks (quick checks; the file names say so).
    Returns the paths by role: ``text``, ``transformer``, ``vae``."""
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2Model

    from twig_core.catalog import DEMO_DIR
    from twig_core.config import SANA_1600M
    from twig_core.dcae import DCAE, DCAE_F32C32_SANA
    from twig_core.transformer import TwigTransformer

    g = torch.Generator().manual_seed(0)
    gemma_tag = "" if gemma_layers == GEMMA_2_2B["num_hidden_layers"] else f"-{gemma_layers}l"
    tag = "" if layers == SANA_1600M.depth else f"_{layers}l"
    paths = {"text": os.path.join(folder, f"gemma-2-2b{gemma_tag}"),
             "transformer": os.path.join(folder, f"twig_fp16{tag}.pth"),
             "vae": os.path.join(folder, "dcae_f32c32.safetensors")}
    if not os.path.isfile(os.path.join(paths["text"], "model.safetensors")):
        os.makedirs(paths["text"], exist_ok=True)
        config = Gemma2Config(**{**GEMMA_2_2B, "num_hidden_layers": gemma_layers})
        config.save_pretrained(paths["text"])
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Gemma2Model(config).state_dict().items()}
        save_file({k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()},
                  os.path.join(paths["text"], "model.safetensors"))
        for name in os.listdir(DEMO_DIR / "tokenizer"):
            shutil.copy(DEMO_DIR / "tokenizer" / name, paths["text"])
    if not os.path.isfile(paths["transformer"]):
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in TwigTransformer(SANA_1600M.replace(depth=layers)).state_dict().items()}
        sd = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
        torch.save({"state_dict": sd}, paths["transformer"])
        del sd
    if not os.path.isfile(paths["vae"]):
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in DCAE(DCAE_F32C32_SANA).state_dict().items()}, paths["vae"])
    return paths
