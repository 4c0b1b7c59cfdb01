"""A tiny English/Chinese tokenizer for the demo text encoder, as a standard Hugging Face fast tokenizer.

The model is a BPE with byte fallback (the same family as the Gemma/Llama tokenizers), trained on the demo
captions:
  * Latin text: spaces become "▁" (Metaspace, a "▁" is prepended to the text like SentencePiece) and the merges
    learned from the captions rebuild whole words, so caption words are single tokens; an unseen English word
    falls back to smaller pieces / single letters (all printable ASCII is in the vocabulary);
  * CJK text: every Han/Kana/Hangul character and every punctuation mark is its own pre-token, so Chinese is
    tokenised character by character;
  * anything not in the vocabulary (an unseen Chinese character, emoji, accented letter) is spelled as UTF-8
    byte tokens <0x00>..<0xFF>, so every string encodes and decodes back exactly (no <unk> is produced).
Special tokens follow Gemma's layout: <pad>=0, <eos>=1, <bos>=2, <unk>=3; by default a <bos> is prepended and
no <eos> appended (as Gemma does), and padding is on the right.

The result is a `transformers.PreTrainedTokenizerFast`; `save_pretrained(folder)` writes tokenizer.json and
tokenizer_config.json, and `AutoTokenizer.from_pretrained(folder)` loads it back, so the text encoder loads it
exactly like a real checkpoint's tokenizer.
"""

from __future__ import annotations

import os
import string
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from twig_core.errors import TwigError

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD, EOS, BOS, UNK = SPECIAL_TOKENS
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{i:02X}>" for i in range(256))
SPACE = "\u2581"  # "▁"

# One pre-token per CJK character (Han, kana, hangul, CJK/full-width punctuation is caught by Punctuation).
_CJK_CHAR = Regex(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\u3000-\u303f\uff00-\uffef]")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True),
        pre_tokenizers.Split(_CJK_CHAR, behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])


def _decoder() -> decoders.Decoder:
    # "▁" -> " ", bytes -> characters, then drop the one space that the pre-tokenizer prepended.
    return decoders.Sequence([
        decoders.Replace(SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])


def _post_processor(tok: Tokenizer, add_bos: bool, add_eos: bool) -> processors.PostProcessor:
    single = " ".join(([f"{BOS}:0"] if add_bos else []) + ["$A:0"] + ([f"{EOS}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{BOS}:1"] if add_bos else []) + ["$B:1"] + ([f"{EOS}:1"] if add_eos else []))
    return processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )


def train_backend(texts: Iterable[str], vocab_size: int = 1400, min_frequency: int = 2) -> Tokenizer:
    """Train the `tokenizers.Tokenizer` (BPE + byte fallback) on `texts`. `vocab_size` includes the 4 special
    tokens and the 256 byte tokens; training stops earlier when no pair is frequent enough, which for the demo
    captions happens once every caption word is one token."""
    texts = list(texts)
    if not texts:
        raise TwigError("train_tokenizer: no training texts")
    n_reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    if vocab_size <= n_reserved + 100:
        raise TwigError(f"train_tokenizer: vocab_size must exceed {n_reserved + 100}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=True, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS),
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(string.printable.strip()) + [SPACE],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Rebuild the model with the byte tokens appended: special tokens first (ids 0..3), then the trained
    # vocabulary, then <0x00>..<0xFF>.
    vocab = tok.get_vocab()
    merges = _merges_of(tok)
    for b in BYTE_TOKENS:
        if b not in vocab:
            vocab[b] = len(vocab)
    model = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=False)
    out = Tokenizer(model)
    out.pre_tokenizer = _pre_tokenizer()
    out.decoder = _decoder()
    out.add_special_tokens(list(SPECIAL_TOKENS))
    return out


def _merges_of(tok: Tokenizer) -> list[tuple[str, str]]:
    import json

    model = json.loads(tok.to_str())["model"]
    merges = model["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def wrap(backend: Tokenizer, add_bos: bool = True, add_eos: bool = False, model_max_length: int = 300,
         padding_side: str = "right"):
    """Wrap a backend `tokenizers.Tokenizer` as a `transformers.PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    for t in SPECIAL_TOKENS:
        if backend.token_to_id(t) is None:
            raise TwigError(f"tokenizer: special token {t} missing from the vocabulary")
    backend.post_processor = _post_processor(backend, add_bos, add_eos)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        add_bos_token=add_bos, add_eos_token=add_eos,
        model_max_length=model_max_length,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike | None = None, vocab_size: int = 1400,
                    min_frequency: int = 2, add_bos: bool = True, add_eos: bool = False,
                    model_max_length: int = 300):
    """Train on `texts` and return the `PreTrainedTokenizerFast`; with `out_dir`, also save it there."""
    tok = wrap(train_backend(texts, vocab_size, min_frequency), add_bos, add_eos, model_max_length)
    if out_dir is not None:
        save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok, out_dir: str | os.PathLike) -> None:
    """save_pretrained, with tokenizer_config.json naming the portable class PreTrainedTokenizerFast (which
    both transformers 4.x and 5.x resolve) and stating the BOS/EOS policy."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    cfg_path = os.path.join(str(out_dir), "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = bool(getattr(tok, "add_bos_token", True))
    cfg["add_eos_token"] = bool(getattr(tok, "add_eos_token", False))
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2, sort_keys=True)


def load_tokenizer(path: str | os.PathLike):
    """Load a saved tokenizer: a folder (via AutoTokenizer, like any checkpoint) or a bare tokenizer.json."""
    path = str(path)
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise TwigError(f"load_tokenizer: {path} has no tokenizer.json")
        return AutoTokenizer.from_pretrained(path)
    if os.path.isfile(path):
        return wrap(Tokenizer.from_file(path))
    raise TwigError(f"load_tokenizer: no such file or folder {path}")

