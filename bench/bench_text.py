"""Prompt encoding with Gemma-2-2B's architecture (random weights, fewer layers for speed): what diffusers runs
(transformers' Gemma2Model through the same Sana prompt handling) in fp32 and in bf16, against the ``fast``
preset's int8 linears (``TextEncoder.use_int8``), one positive prompt (Sana's instruction, 300 tokens) and the
empty negative, in one process; prints each time, its ratio to the best float one, and the int8 states' error.

    python bench/bench_text.py --layers 2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import GEMMA_2_2B  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="Gemma layers (26 in Gemma-2-2B; time is per layer)")
    p.add_argument("--repeats", type=int, default=2, help="timed encodes per contender (the best counts)")
    p.add_argument("--no-bf16", action="store_true", help="leave out transformers bf16 (CPUs without native bf16, "
                   "where it is several times slower than fp32)")
    a = p.parse_args()
    from transformers import Gemma2Config, Gemma2Model

    from twig_core.catalog import DEMO_DIR
    from twig_core.text import TextEncoder
    from twig_core.tokenizer import read_tokenizer

    torch.set_grad_enabled(False)
    tokenizer = read_tokenizer(DEMO_DIR / "tokenizer")
    torch.manual_seed(0)  # the vocabulary is the tokenizer's: the embedding's size does not change the time
    config = Gemma2Config(**{**GEMMA_2_2B, "num_hidden_layers": a.layers, "vocab_size": len(tokenizer)})
    config._attn_implementation = "eager"
    model = Gemma2Model(config).eval()
    prompt = "a red fox standing in fresh snow at dawn, soft light, detailed fur; 一只站在雪地里的红狐狸"

    def encode(te):
        return te.encode(prompt).embeds.float(), te.encode("", use_instruction=False).embeds.float()

    contenders = {"transformers fp32": TextEncoder(model, tokenizer)}
    if not a.no_bf16:
        contenders["transformers bf16"] = TextEncoder(copy.deepcopy(model).bfloat16(), tokenizer)
    quick = TextEncoder(copy.deepcopy(model), tokenizer)
    t0 = time.perf_counter()
    quick.use_int8()
    print(f"int8 switched on (packing, calibration) in {time.perf_counter() - t0:.1f} s")
    contenders["twig fast (int8)"] = quick
    times, states = {}, {}
    for name, te in contenders.items():
        encode(te)  # warm-up
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            states[name] = encode(te)
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    anchor = min(times[k] for k in ("transformers fp32", "transformers bf16") if k in times)
    print(f"Gemma-2-2B architecture, {a.layers} of 26 layers, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}")
    for name, s in times.items():
        ref = states["transformers fp32"]
        err = max(((g - r).norm() / r.norm()).item() for g, r in zip(states[name], ref))
        print(f"  {name:<20} {s:7.2f} s  {s / anchor:5.2f}x the best float  error vs fp32 {err:.2e}")


if __name__ == "__main__":
    main()
