"""Tiny random stand-ins for every model the pack loads, built in-process (no downloads), for the tests and the
ComfyUI check (one builder per model; fixtures shared by several test modules are in conftest.py).

Text encoder: ``build_tiny_gemma_tokenizer()`` a Gemma-style BPE (``GemmaTokenizer``) trained on a few English
and Chinese sentences and Sana's instruction text; ``build_fast_tokenizer()`` the same kind of vocabulary as a
``PreTrainedTokenizerFast`` (loads on transformers 4.4x too, without sentencepiece); ``build_tiny_gemma2()`` a
2-layer, 64-wide random Gemma-2; ``save_tiny_gemma2_folder()`` both as a Hugging Face folder.

Twig: ``tiny_transformer()`` (2 blocks, 64 wide), ``tiny_dcae()`` (six stages: 32x down, 32 latent channels);
``write_model_folders(root)`` the three written the way users install real ones (a ComfyUI-style models/ folder);
``write_tiny_pipeline(out)`` a pipeline folder in the embedded demo model's layout, written by the demo recipe's
exporter; ``write_demo_pipeline(out)`` that folder as a stand-in for the demo model itself.

TIPO: ``build_tiny_tipo_tokenizer()``, ``build_tiny_tipo()``, ``save_tiny_tipo_folder()`` (see the TIPO section).
Everything is small enough to build and run in a second or two on a CPU.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.export import export_pipeline
from twig_core.config import TransformerConfig
from twig_core.dcae import DCAE, RES_BLOCK, VIT_BLOCK, DCAEConfig
from twig_core.text import TextEncoder
from twig_core.transformer import TwigTransformer

# --------------------------------------------------------------------------------------------------
# Gemma-2 text encoder and its tokenizers

TINY_CORPUS = [
    "A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill.",
    "A bustling city street scene at dusk, featuring glowing street lamps and a double-decker bus.",
    "a cyberpunk cat with a neon sign that says Sana",
    "A photo of an astronaut riding a horse on the moon, highly detailed, 8k, cinematic lighting.",
    "An oil painting of a lighthouse on a rocky coast during a storm, dramatic waves, dark clouds.",
    "portrait of a young woman with red hair, freckles, green eyes, soft light, shallow depth of field",
    "low quality, blurry, watermark, text, deformed hands, extra fingers, jpeg artifacts",
    "一只可爱的小猫在窗台上睡觉，阳光温暖，窗外开满了红色的花。",
    "繁华的城市街道，黄昏时分，路灯闪烁，人群穿着五颜六色的衣服。",
    "山水画，远处的高山被云雾环绕，近处有一条小河和一座木桥。",
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions.",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
]

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, Gemma's order for the first three
DEMO_PROMPTS = ["左边一个红色的圆，右边一个蓝色的正方形", "a green triangle above a yellow circle",
                "红色的三角形", "a blue square on the left, a red circle on the right"]


def _gemma_like_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str], **trainer_options):
    """A ``tokenizers`` BPE trained like Gemma's vocabulary: spaces as "▁", byte fallback, merges kept inside
    "▁word" pieces (the split applies while training)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  **trainer_options)
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_tiny_gemma_tokenizer(vocab_size: int = 700, corpus: list[str] | None = None):
    """A transformers GemmaTokenizer over a BPE vocabulary trained on ``corpus``.

    Like Gemma's: spaces normalized to "▁", no pre-tokenization at encode time, byte fallback for unseen
    characters (<0x00>..<0xFF> are in the vocabulary), <bos> prepended, no <eos> appended.
    """
    from transformers import GemmaTokenizer

    trained = _gemma_like_bpe(corpus or TINY_CORPUS, vocab_size, SPECIAL_TOKENS)
    vocab = dict(trained.get_vocab())
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(trained.to_str())["model"]["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def build_fast_tokenizer(vocab_size: int = 600):
    """Gemma-like BPE (<pad>=0 <eos>=1 <bos>=2 <unk>=3, "▁" for spaces, byte fallback, <bos> prepended) as a
    ``PreTrainedTokenizerFast``, trained on the tiny corpus and the demo prompts."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _gemma_like_bpe(TINY_CORPUS + DEMO_PROMPTS, vocab_size, ["<pad>", "<eos>", "<bos>", "<unk>"],
                          initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])
    for b in range(256):
        if tok.token_to_id(f"<0x{b:02X}>") is None:
            tok.add_tokens([f"<0x{b:02X}>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_gemma2_config(vocab_size: int, **sizes):
    """The tiny Gemma-2's config; ``sizes`` replace any of its fields (e.g. a wider model)."""
    from transformers import Gemma2Config

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    return Gemma2Config(**{**fields, **sizes})


def build_tiny_gemma2(tokenizer, seed: int = 0, causal_lm: bool = False, **sizes):
    """A random tiny Gemma-2 (eval mode, float32; ``sizes``: config fields to change, see tiny_gemma2_config).
    Norm weights are randomized too, so nothing is trivial."""
    from transformers import Gemma2ForCausalLM, Gemma2Model

    torch.manual_seed(seed)
    config = tiny_gemma2_config(len(tokenizer), **sizes)
    model = (Gemma2ForCausalLM if causal_lm else Gemma2Model)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


def save_tiny_gemma2_folder(path: str | os.PathLike, seed: int = 0, causal_lm: bool = False, **sizes):
    """Save a tiny Gemma-2 + tokenizer as a plain Hugging Face folder; returns (model, tokenizer)."""
    tokenizer = build_tiny_gemma_tokenizer()
    model = build_tiny_gemma2(tokenizer, seed=seed, causal_lm=causal_lm, **sizes)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Twig transformer and DC-AE, model folders, pipeline folders

# heads of width 32, so every size can be inferred from tensor shapes; caption width = tiny Gemma's hidden size
TINY_TRANSFORMER = TransformerConfig(in_channels=32, out_channels=32, width=64, depth=2, heads=2, cross_heads=2,
                                     caption_channels=64)

# six stages -> 32x downsampling and 32 latent channels like the real DC-AE, a few thousand weights per stage
TINY_DCAE = DCAEConfig(
    latent_channels=32,
    encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
    decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
    encoder_layers_per_block=(1,) * 6,
    decoder_layers_per_block=(1,) * 6,
    encoder_block_types=(RES_BLOCK,) * 4 + (VIT_BLOCK,) * 2,
    decoder_block_types=(RES_BLOCK,) * 4 + (VIT_BLOCK,) * 2,
    encoder_qkv_multiscales=((),) * 4 + ((5,), (5,)),
    decoder_qkv_multiscales=((),) * 4 + ((5,), (5,)),
    attention_head_dim=8,
    decoder_norm_types=("rms_norm",) * 6,
    decoder_act_fns=("silu",) * 6,
)

NATIVE = 128  # pixels: the native size of the pipeline folders below, like the demo model (sample_size 4)


def mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of the file ``path`` (Linux, /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(" ", 1)[0]
            if "-" in first and ":" not in first:
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def tiny_transformer(seed: int = 0, sample_size: int | None = None) -> TwigTransformer:
    """Random tiny transformer; ``sample_size`` (latent pixels) changes the native size only, not the weights."""
    torch.manual_seed(seed)
    config = TINY_TRANSFORMER if sample_size is None else TINY_TRANSFORMER.replace(sample_size=sample_size)
    model = TwigTransformer(config)
    with torch.no_grad():  # some layers start at zero; randomise all so outputs depend on every input
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_native_transformer(seed: int = 0) -> TwigTransformer:
    """``tiny_transformer`` native at ``NATIVE`` pixels, as in the pipeline folders."""
    return tiny_transformer(seed, sample_size=NATIVE // 32)


def tiny_dcae(seed: int = 0) -> DCAE:
    torch.manual_seed(seed)
    return DCAE(TINY_DCAE).eval()


def write_model_folders(root: str | os.PathLike, prefix: str = "tiny") -> dict[str, str]:
    """Write the three tiny models under ``root`` (a models/ folder); returns the names a loader combo shows:
      diffusion_models/<prefix>_twig.safetensors   transformer, original NVlabs names
      vae/<prefix>_dcae.safetensors                DC-AE, diffusers AutoencoderDC names
      text_encoders/<prefix>_gemma/                Gemma-2 Hugging Face folder with its tokenizer"""
    root = Path(root)
    for sub in ("diffusion_models", "vae", "text_encoders", "checkpoints"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = {
        "model": f"{prefix}_twig.safetensors",
        "vae": f"{prefix}_dcae.safetensors",
        "text_encoder": f"{prefix}_gemma/",
    }
    save_file(tiny_transformer().state_dict(), str(root / "diffusion_models" / names["model"]))
    save_file(tiny_dcae().state_dict(), str(root / "vae" / names["vae"]))
    save_tiny_gemma2_folder(root / "text_encoders" / names["text_encoder"].rstrip("/"))
    return names


def write_tiny_pipeline(out: str | os.PathLike, seed: int = 0, tokenizer=None, dtype=torch.float32) -> Path:
    """The pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/) at ``out``, written
    by the demo recipe's exporter: ``tiny_native_transformer``, ``tiny_dcae`` and a tiny Gemma-2 without Sana's
    instruction prefix, over ``tokenizer`` (default: ``build_fast_tokenizer()``), weights stored in ``dtype``."""
    tokenizer = build_fast_tokenizer() if tokenizer is None else tokenizer
    text_encoder = TextEncoder(build_tiny_gemma2(tokenizer, seed=seed), tokenizer, instruction=[])
    export_pipeline(Path(out), tiny_native_transformer(seed), tiny_dcae(seed), text_encoder, dtype=dtype)
    return Path(out)


def write_demo_pipeline(out: str | os.PathLike) -> Path:
    """A stand-in for the embedded demo model (``twig_core/demo_model``), so workflow tests and the ComfyUI check
    run without the trained weights: ``write_tiny_pipeline`` with the Gemma tokenizer and fp16 weights."""
    return write_tiny_pipeline(out, tokenizer=build_tiny_gemma_tokenizer(), dtype=torch.float16)


def write_tiny_lora(path: str | os.PathLike, rank: int = 3, seed: int = 0) -> Path:
    """A random LoRA for ``tiny_transformer`` (and the demo stand-in), written by our trainer in the
    diffusers/PEFT layout."""
    from safetensors.torch import save_file

    from training.lora import apply_lora, peft_state_dict

    model = tiny_transformer()
    torch.manual_seed(seed)
    params = apply_lora(model, rank=rank)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * 0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(model), path)
    return path


# --------------------------------------------------------------------------------------------------
# TIPO: a byte-level BPE tokenizer trained on TIPO-format text and a random 2-layer ``LlamaForCausalLM`` nudged
# to answer in tags.
#
# The nudge: every token embedding carries a constant in channel 0 and a "word or comma" sign in channel 1;
# the output head reads channel 0 as a per-token preference (whole words of the corpus and "," high,
# everything else far below what top-k / min-p keep) and channel 1 as "after a word comes a comma". So a
# sample reads like ``, smile, river, hat, ...``, varies with the seed, and never ends in "s" (a tag ending in
# "s" at the very end of an answer is where TIPO-KGen's marker stripping and a correct one differ).
#
# ``save_tiny_tipo_folder(path)`` writes the pair as a Hugging Face folder, like a TIPO model in models/LLM.

TIPO_TAGS = ["1girl", "solo", "red hair", "smile", "long hair", "looking at viewer", "outdoor", "flower",
             "white skirt", "sky", "cloud", "tree", "cat", "bird", "night", "sunset", "river", "standing", "sitting",
             "hat", "cute", "rain", "holding umbrella", "blue eye", "scenery"]
TIPO_SENTENCES = ["A girl with red hair and a white skirt standing under a tree.",
                  "The sky at sunset, a cat on the river bank.", "A cute bird on a flower in the rain."]
TIPO_SPECIAL = ["<unk>", "<s>", "</s>", "<|very_short|>", "<|short|>", "<|long|>", "<|very_long|>",
                "<|tag_to_long|>", "<|long_to_tag|>", "<|short_to_tag|>", "<|short_to_tag_to_long|>",
                "<|tag_to_short|>", "<|tag_to_short_to_long|>", "<|tag_to_long_to_short|>", "<|gen_meta|>", "<|empty|>"]


def tipo_corpus(n: int = 60, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        out.append("rating: general\nquality: masterpiece\naspect_ratio: 1.0\ntarget: <|long|> <|tag_to_long|>\n"
                   f"tag: {', '.join(r.sample(TIPO_TAGS, 8))}\nlong: {' '.join(r.sample(TIPO_SENTENCES, 2))}")
    return out


def build_tiny_tipo_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TIPO_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tipo_corpus(), trainer)
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

    words = {w.strip(".,") for line in tipo_corpus() for w in line.split()}
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


# ---- inputs and node calls the tests share


def transformer_inputs(cfg, b=2, h=8, w=6, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)
    ctx = torch.randn(b, n, cfg.caption_channels, generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, 7:] = 0  # first prompt padded after 7 tokens
    t = torch.tensor([999.0, 123.5])[:b]
    return x, t, ctx, mask


def empty_latent(w=128, h=96, batch=1):
    from nodes.latent import TwigEmptyLatent

    return TwigEmptyLatent().generate("custom", w, h, batch)[0]


def run_sampler(parts, conds, latent, seed=1, steps=3, cfg=4.5, sampler="flow_dpmpp_2m", denoise=1.0):
    from nodes.sampling import TwigSampler

    model = parts[0]
    return TwigSampler().sample(model, conds[0], conds[1], latent, seed, steps, cfg, sampler, 3.0, denoise)[0]
