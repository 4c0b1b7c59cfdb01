"""A TIPO model: a transformers ``LlamaForCausalLM`` and its tokenizer, loaded from local files only.

Accepted layouts (nothing is downloaded, no code from the folder is run):

- a folder with ``config.json`` (``model_type: llama``), ``*.safetensors`` weights (or ``pytorch_model.bin``)
  and the tokenizer files (``tokenizer.json`` / ``tokenizer.model`` + ``tokenizer_config.json``), as the
  TIPO repositories ship (TIPO-500M, TIPO-200M, TIPO-100M and their fine-tunes);
- a single ``.safetensors`` file with ``config.json`` and the tokenizer in a folder of the same name beside
  it (``TIPO-500M.safetensors`` + ``TIPO-500M/``) or in the file's own folder.

Sampling is seeded from a CPU generator of its own: the same request, seed and settings draw the same way on
any device (the text is the same where the logits are), and the caller's random streams are left as they were.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..devices import resolve_dtype
from ..errors import TwigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Sampling:
    """Sampling settings of one pass. ``temperature`` 0 = greedy; ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0
    switch those filters off. ``repetition_penalty`` 1.17 is what TIPO's own tools use."""

    temperature: float = 0.5
    top_p: float = 0.95
    top_k: int = 80
    min_p: float = 0.05
    repetition_penalty: float = 1.17
    max_new_tokens: int = 512

    def check(self) -> "Sampling":
        if self.temperature < 0:
            raise TwigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TwigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise TwigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise TwigError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_new_tokens < 1:
            raise TwigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return self


@dataclass
class Generation:
    text: str  # the request followed by the model's continuation
    prompt_tokens: int
    new_tokens: int


def _transformers_dtype_kw(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def _read_config(folder: str):
    from transformers import AutoConfig

    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise TwigError(f"cannot read {path}: {e}") from e
    if raw.get("model_type") != "llama":
        raise TwigError(f"{path}: model_type is {raw.get('model_type')!r}; a TIPO model is a LLaMA ('llama')")
    return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def find_files(path: str) -> tuple[str, str, str | None]:
    """(config folder, tokenizer folder, weights file or None for "the folder's own weights") for ``path``."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise TwigError(f"TIPO model folder {path} has no config.json")
        tok = path if _has_tokenizer(path) else os.path.join(path, "tokenizer")
        if not _has_tokenizer(tok):
            raise TwigError(f"TIPO model folder {path} has no tokenizer (tokenizer.json or tokenizer.model)")
        return path, tok, None
    if os.path.isfile(path):
        if not path.lower().endswith((".safetensors", ".sft")):
            raise TwigError(f"{path}: a single-file TIPO model must be .safetensors (or use the model's folder)")
        stem = os.path.splitext(path)[0]
        for folder in (stem, os.path.dirname(path)):
            if os.path.isfile(os.path.join(folder, "config.json")) and _has_tokenizer(folder):
                return folder, folder, path
        raise TwigError(
            f"{path}: a single-file TIPO model needs config.json and the tokenizer files "
            f"in {stem}{os.sep} or beside the file"
        )
    raise TwigError(f"TIPO model not found: {path} (put the model folder in models/LLM)")


class TipoModel:
    """``LlamaForCausalLM`` + tokenizer with a seeded ``generate``."""

    def __init__(self, model, tokenizer, path: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        vocab = int(model.config.vocab_size)
        if len(tokenizer) > vocab:
            raise TwigError(
                f"tokenizer and model do not match{' in ' + path if path else ''}: the tokenizer has "
                f"{len(tokenizer)} tokens but the model's embedding has {vocab} rows"
            )
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = getattr(model.config, "eos_token_id", None)

    def __repr__(self) -> str:
        return f"<TipoModel {os.path.basename(self.path.rstrip(os.sep)) or 'in memory'} {self.dtype} on {self.device}>"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "TipoModel":
        self.model.to(device=device, dtype=dtype)
        return self

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu") -> "TipoModel":
        """Load a TIPO model folder or single file (see the module docstring)."""
        from transformers import AutoTokenizer, LlamaForCausalLM

        device = torch.device(device)
        dtype = resolve_dtype(dtype or "auto", device, role="tipo")
        config_dir, tok_dir, weights = find_files(path)
        config = _read_config(config_dir)
        try:
            if weights is None:
                model = LlamaForCausalLM.from_pretrained(
                    config_dir, config=config, local_files_only=True, trust_remote_code=False,
                    **_transformers_dtype_kw(dtype))
            else:
                from safetensors.torch import load_file

                sd = load_file(weights)
                if not any(k.startswith("model.") for k in sd):
                    sd = {("lm_head." + k[len("lm_head."):]) if k.startswith("lm_head.") else "model." + k: v
                          for k, v in sd.items()}
                model = LlamaForCausalLM.from_pretrained(
                    None, config=config, state_dict=sd, **_transformers_dtype_kw(dtype))
        except Exception as e:  # a wrong or damaged file: one readable error naming it
            raise TwigError(f"cannot load TIPO weights from {weights or config_dir}: {type(e).__name__}: {e}") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, TypeError) as e:
            raise TwigError(f"cannot load the TIPO tokenizer from {tok_dir}: {e}") from e
        model = model.to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, os.fspath(path))

    @torch.no_grad()
    def generate(self, prompt: str, seed: int, sampling: Sampling | None = None,
                 step_callback: Callable[[int], None] | None = None) -> Generation:
        """The request ``prompt`` continued by the model (at most ``max_new_tokens`` new tokens).

        ``step_callback(n)`` is called after each new token with the number written so far (raise from it
        to stop).
        """
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        s = (sampling or Sampling()).check()
        enc = self.tokenizer(prompt, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        mask = enc.get("attention_mask")
        mask = mask.to(self.device) if mask is not None else torch.ones_like(ids)
        # always greedy search: with a temperature, over logits that _cpu_sampler turns into a seeded draw
        opts = dict(do_sample=False, max_new_tokens=int(s.max_new_tokens),
                    min_new_tokens=min(2, int(s.max_new_tokens)), repetition_penalty=float(s.repetition_penalty))
        processors = [] if s.temperature == 0 else [_cpu_sampler(s, int(seed))]
        if self.eos_token_id is not None:
            opts["eos_token_id"] = self.eos_token_id
            if getattr(self.model.generation_config, "pad_token_id", None) is None:
                opts["pad_token_id"] = self.eos_token_id
        config = GenerationConfig(**opts)
        criteria = None
        if step_callback is not None:
            start = ids.shape[1]

            class _Callback(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    step_callback(int(input_ids.shape[1] - start))
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

            criteria = StoppingCriteriaList([_Callback()])
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                  stopping_criteria=criteria, logits_processor=LogitsProcessorList(processors))
        new = out[0, ids.shape[1]:]
        return Generation(self._continue(prompt, ids[0], new), int(ids.shape[1]), int(new.shape[0]))

    def _continue(self, prompt: str, prompt_ids: torch.Tensor, new_ids: torch.Tensor) -> str:
        """``prompt`` + the decoded new tokens. Decoding prompt+new and removing the decoded prompt keeps the
        spacing a tokenizer gives a continuation (some decoders drop the first token's leading space)."""
        dec = lambda t: self.tokenizer.decode(t.tolist(), skip_special_tokens=True)  # noqa: E731
        head = dec(prompt_ids)
        full = dec(torch.cat([prompt_ids, new_ids]))
        tail = full[len(head):] if full.startswith(head) else dec(new_ids)
        return prompt + tail


def _cpu_sampler(s: Sampling, seed: int):
    """A logits processor that makes greedy search draw a sample: it applies the sampling filters (transformers'
    own warpers, in the order its sampling uses), draws the next token from the filtered distribution with a
    CPU generator seeded with ``seed`` (as transformers' sampling draws, after ``torch.manual_seed``, on a CPU)
    and leaves only that token possible. The same seed draws the same way on any device; the device's generator
    and the caller's random streams are never used."""
    from transformers import (LogitsProcessor, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    warpers = [TemperatureLogitsWarper(float(s.temperature))]
    if s.top_k:
        warpers.append(TopKLogitsWarper(int(s.top_k)))
    if s.top_p < 1:
        warpers.append(TopPLogitsWarper(float(s.top_p)))
    if s.min_p > 0:
        warpers.append(MinPLogitsWarper(float(s.min_p)))
    generator = torch.Generator().manual_seed(seed % 2**32)

    class CpuDraw(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for w in warpers:
                scores = w(input_ids, scores)
            probs = torch.softmax(scores.float(), dim=-1).cpu()
            pick = torch.multinomial(probs, 1, generator=generator).to(scores.device)
            return torch.full_like(scores, -float("inf")).scatter_(1, pick, 0.0)

    return CpuDraw()
