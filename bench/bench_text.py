"""Prompt encoding with Gemma-2-2B: what diffusers runs (transformers' Gemma2Model over the whole padded instruction
+ prompt sequence, ``TextEncoder.forward``) against Twig's ``TextEncoder.encode`` (the instruction's keys/values
made on the first prompt, reused for the next), in fp32; optionally transformers bf16. Each contender encodes two different positive prompts in a row (Sana's
instruction, 300 tokens), then the empty negative, in one process, taking turns; prints each time and the states' error against
transformers fp32 at the positions the mask keeps (Twig runs Gemma only that far and leaves zeros at the padding,
which the transformer masks out).

    python bench/bench_text.py --layers 2                             # random weights, fewer layers
    python bench/bench_text.py --folder /tmp/e2e/gemma-2-2b --no-bf16   # a Gemma-2 folder, all layers
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

PROMPTS = ("a red fox standing in fresh snow at dawn, soft light, detailed fur; 一只站在雪地里的红狐狸",
           "an old lighthouse on a cliff in a storm, waves breaking, dramatic clouds, oil painting")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", help="a Gemma-2 folder to load in fp32 (else random weights in Gemma-2-2B's shape)")
    p.add_argument("--layers", type=int, default=2, help="Gemma layers without --folder (26 in Gemma-2-2B)")
    p.add_argument("--no-bf16", action="store_true", help="leave out transformers bf16 (CPUs without native bf16, "
                   "where it is several times slower than fp32)")
    a = p.parse_args()
    from twig_core.text import TextEncoder

    torch.set_grad_enabled(False)
    if a.folder:
        t0 = time.perf_counter()
        base = TextEncoder.from_pretrained(a.folder, dtype=torch.float32)
        label = f"{a.folder}, {base.model.config.num_hidden_layers} layers, loaded in {time.perf_counter() - t0:.1f} s"
    else:
        from transformers import Gemma2Config, Gemma2Model

        from twig_core.catalog import DEMO_DIR
        from twig_core.tokenizer import read_tokenizer

        tokenizer = read_tokenizer(DEMO_DIR / "tokenizer")
        torch.manual_seed(0)  # the vocabulary is the tokenizer's: the embedding's size does not change the time
        config = Gemma2Config(**{**GEMMA_2_2B, "num_hidden_layers": a.layers, "vocab_size": len(tokenizer)})
        config._attn_implementation = "eager"
        base = TextEncoder(Gemma2Model(config).eval(), tokenizer)
        label = f"Gemma-2-2B architecture, {a.layers} of 26 layers"

    def copy_of(te, dtype=None):
        model = copy.deepcopy(te.model)
        return TextEncoder(model if dtype is None else model.to(dtype), te.tokenizer)

    # name -> (encoder, its run): the transformers rows run the whole sequence every time, as diffusers does
    contenders = {"transformers fp32": (base, base.forward)}
    if not a.no_bf16:
        bf16 = copy_of(base, torch.bfloat16)
        contenders["transformers bf16"] = (bf16, bf16.forward)
    twig = TextEncoder(base.model, base.tokenizer)  # the same weights
    contenders["twig fp32"] = (twig, twig.encode)

    inputs = [(PROMPTS[0], True), (PROMPTS[1], True), ("", False)]
    times, states = {name: [] for name in contenders}, {name: [] for name in contenders}
    for te, run in contenders.values():
        run("a", max_length=8, use_instruction=False)  # warm-up that leaves no prefix behind
    for text, instruction in inputs:  # contenders take turns, so a busy machine slows them alike
        for name, (te, run) in contenders.items():
            t0 = time.perf_counter()
            cond = run(text, use_instruction=instruction)
            states[name].append(cond.embeds.float() * cond.mask[..., None])  # padding: never read downstream
            times[name].append(time.perf_counter() - t0)
    print(f"{label}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print(f"  {'':<20} {'1st prompt':>10} {'2nd prompt':>10} {'negative':>9}  error vs fp32")
    ref = states["transformers fp32"]
    for name, (first, second, negative) in times.items():
        err = max(((g - r).norm() / r.norm()).item() for g, r in zip(states[name], ref))
        print(f"  {name:<20} {first:8.2f} s {second:8.2f} s {negative:7.2f} s  {err:.2e}")


if __name__ == "__main__":
    main()
