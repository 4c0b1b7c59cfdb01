"""A tiny TIPO stand-in built in-process: a byte-level BPE tokenizer trained on TIPO-format text and a random
2-layer ``LlamaForCausalLM`` nudged to answer in tags.

The nudge: every token embedding carries a constant in channel 0 and a "word or comma" sign in channel 1;
the output head reads channel 0 as a per-token preference (whole words of the corpus and "," high,
everything else far below what top-k / min-p keep) and channel 1 as "after a word comes a comma". So a
sample reads like ``, smile, river, hat, ...``, varies with the seed, and never ends in "s" (a tag ending in
"s" at the very end of an answer is where TIPO-KGen's marker stripping and a correct one differ).

``save_tiny_tipo_folder(path)`` writes the pair as a Hugging Face folder, like a TIPO model in models/LLM.
"""

from __future__ import annotations

import os
import random

import torch

TAGS = ["1girl", "solo", "red hair", "smile", "long hair", "looking at viewer", "outdoor", "flower",
        "white skirt", "sky", "cloud", "tree", "cat", "bird", "night", "sunset", "river", "standing", "sitting",
        "hat", "cute", "rain", "holding umbrella", "blue eye", "scenery"]
SENTENCES = ["A girl with red hair and a white skirt standing under a tree.",
             "The sky at sunset, a cat on the river bank.", "A cute bird on a flower in the rain."]
SPECIAL = ["<unk>", "<s>", "</s>", "<|very_short|>", "<|short|>", "<|long|>", "<|very_long|>", "<|tag_to_long|>",
           "<|long_to_tag|>", "<|short_to_tag|>", "<|short_to_tag_to_long|>", "<|tag_to_short|>",
           "<|tag_to_short_to_long|>", "<|tag_to_long_to_short|>", "<|gen_meta|>", "<|empty|>"]


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        out.append("rating: general\nquality: masterpiece\naspect_ratio: 1.0\ntarget: <|long|> <|tag_to_long|>\n"
                   f"tag: {', '.join(r.sample(TAGS, 8))}\nlong: {' '.join(r.sample(SENTENCES, 2))}")
    return out


def build_tiny_tipo_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_tipo(tokenizer, seed: int = 0, vocab_size: int | None = None):
    """A random tiny LLaMA over ``tokenizer`` (``vocab_size`` overrides the embedding size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    V = vocab_size or len(tokenizer)
    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()

    words = {w.strip(".,") for line in corpus() for w in line.split()}
    pref = torch.full((V,), -3.0)
    for text_id in range(min(V, len(tokenizer))):
        text = tokenizer.decode([text_id])
        if text.startswith(" ") and text.strip() in words and not text.endswith("s"):
            pref[text_id] = 1.0
    word = pref == 1.0
    comma = tokenizer(",", add_special_tokens=False)["input_ids"][0]
    pref[comma] = 1.8
    pref[tokenizer.eos_token_id] = 0.2
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.1)
        emb[:, 0] = 1.0
        emb[word, 1] = 1.0
        emb[comma, 1] = -1.0
        head = model.lm_head.weight
        head.normal_(0, 0.1)
        head[:, 0] = 2.0 * pref
        head[comma, 1] = 3.0
        head[word, 1] = -1.0
    return model


def save_tiny_tipo_folder(path: str | os.PathLike, seed: int = 0):
    """Write tokenizer + model as a Hugging Face folder; returns (model, tokenizer)."""
    tokenizer = build_tiny_tipo_tokenizer()
    model = build_tiny_tipo(tokenizer, seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return model, tokenizer
