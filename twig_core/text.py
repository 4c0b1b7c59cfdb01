"""Text conditioning: Gemma-2 hidden states, prepared the way Sana prepares them.

Sana feeds its transformer the last hidden state of a Gemma-2 decoder (after the final norm), with a
fixed "complex human instruction" written in front of the user's prompt:

1. the prompt is stripped of surrounding whitespace (diffusers also lower-cases it, see ``lowercase``);
2. instruction + prompt is tokenized with a leading ``<bos>``, truncated and right-padded to
   ``instruction_tokens + max_length - 2`` tokens (``instruction_tokens`` counts the ``<bos>`` too);
3. Gemma-2 runs over the whole sequence with the padding mask (causal attention, so every prompt token
   sees the instruction);
4. only position 0 (``<bos>``) and the last ``max_length - 1`` positions are kept, for the hidden states
   and the mask alike.

The instruction ends with ``"User Prompt: "``; Gemma's tokenizer usually merges that trailing space into
the prompt's first token, so a full prompt contributes ``max_length - 1`` tokens after ``<bos>`` and the
instruction itself never reaches the transformer, it only shapes the prompt tokens' states.

The negative prompt takes the plain path: no instruction, ``max_length`` tokens, same selection (which
then keeps everything). Sana uses ``max_length = 300``; Twig allows up to 1200.

Gemma-2 soft-caps its attention logits; only the "eager" (and flash/flex) attention paths in
transformers apply the cap, which is why the loader (``twig_core.gemma``) asks for "eager". Gemma-2
overflows in float16: load it in bfloat16 (GPU) or float32 (CPU).

The instruction is the same for every positive prompt and Gemma-2 is causal, so :meth:`TextEncoder.encode` runs it
once: it keeps the keys/values of the instruction's stable token prefix (see :meth:`TextEncoder._prefix_ids`) and
runs each prompt's remaining positions on top of them (transformers' ``DynamicCache``), which gives the same states
as the full forward. :meth:`TextEncoder.forward` (with gradients: training) always runs the whole sequence.
"""

from __future__ import annotations

import inspect
import itertools
import json
import operator
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .errors import TwigError

# The instruction Sana prepends to every positive prompt (lines joined with "\n"). It is the default
# `complex_human_instruction` of diffusers' SanaPipeline and the `chi_prompt` of the NVlabs configs.
COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)

SANA_MAX_LENGTH = 300  # what Sana was trained with
MAX_LENGTH_LIMIT = 1200  # what Twig advertises
MIN_MAX_LENGTH = 2  # <bos> + one position


def check_max_length(max_length) -> int:
    """Return ``max_length`` as an int, or raise TwigError if it is not a whole number in [2, 1200]."""
    try:
        if isinstance(max_length, bool):
            raise TypeError
        value = operator.index(max_length)
    except TypeError:
        raise TwigError(f"text max_length must be a whole number of tokens, got {max_length!r}") from None
    if not MIN_MAX_LENGTH <= value <= MAX_LENGTH_LIMIT:
        raise TwigError(
            f"text max_length must be between {MIN_MAX_LENGTH} and {MAX_LENGTH_LIMIT} tokens "
            f"(Sana uses {SANA_MAX_LENGTH}), got {value}"
        )
    return value


# --------------------------------------------------------------------------------------------------
# Conditioning


@dataclass(frozen=True)
class TokenReport:
    """How much of one prompt reached the model.

    ``prompt_tokens`` counts the prompt's own tokens as they are tokenized in place (after the
    instruction when there is one), without ``<bos>`` and without the instruction; ``kept_tokens`` is
    how many of them survived truncation.
    """

    prompt_tokens: int
    kept_tokens: int

    @property
    def dropped_tokens(self) -> int:
        return self.prompt_tokens - self.kept_tokens

    @property
    def truncated(self) -> bool:
        return self.kept_tokens < self.prompt_tokens

    def warning(self) -> str | None:
        """A one-line message for the UI when the prompt was cut, else None."""
        if not self.truncated:
            return None
        return (
            f"prompt has {self.prompt_tokens} tokens, kept {self.kept_tokens} "
            f"({self.dropped_tokens} dropped from the end)"
        )


@dataclass
class Conditioning:
    """Text conditioning for the transformer.

    embeds: [B, N, C] hidden states; mask: [B, N] (1 = real token, 0 = padding).
    reports: one TokenReport per row when the rows came from :meth:`TextEncoder.encode`, else empty.
    """

    embeds: Tensor
    mask: Tensor
    reports: tuple[TokenReport, ...] = field(default=())

    def __post_init__(self):
        if self.embeds.ndim != 3:
            raise TwigError(f"Conditioning.embeds must be [B, N, C], got shape {tuple(self.embeds.shape)}")
        if tuple(self.mask.shape) != tuple(self.embeds.shape[:2]):
            raise TwigError(
                f"Conditioning.mask must be [B, N] = {tuple(self.embeds.shape[:2])}, got {tuple(self.mask.shape)}"
            )
        self.reports = tuple(self.reports)
        if self.reports and len(self.reports) != self.embeds.shape[0]:
            raise TwigError(
                f"Conditioning.reports has {len(self.reports)} entries for a batch of {self.embeds.shape[0]}"
            )

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    @property
    def seq_len(self) -> int:
        return self.embeds.shape[1]

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move to ``device``; ``dtype`` applies to the embeddings only (the mask keeps its integer type)."""
        return Conditioning(self.embeds.to(device=device, dtype=dtype), self.mask.to(device=device), self.reports)

    def token_counts(self) -> list[int]:
        """Number of unmasked positions per row (``<bos>`` included)."""
        return [int(n) for n in self.mask.bool().sum(dim=1).tolist()]

    def warnings(self) -> list[str]:
        """Truncation messages for the rows that were cut (empty when nothing was cut)."""
        return [w for w in (r.warning() for r in self.reports) if w]

    def repeat(self, n: int) -> "Conditioning":
        """Repeat each row ``n`` times in place (rows a, b -> a, a, b, b), e.g. for images per prompt."""
        if n == 1:
            return self
        return Conditioning(
            self.embeds.repeat_interleave(n, dim=0),
            self.mask.repeat_interleave(n, dim=0),
            tuple(r for r in self.reports for _ in range(n)),
        )

    @staticmethod
    def cat(conds: Sequence["Conditioning"]) -> "Conditioning":
        """Stack along the batch (e.g. [negative, positive] for one CFG pass).

        Shorter sequences are padded at the end with zero embeddings and mask 0, which attention with
        the mask ignores. Embeddings take the first item's dtype and device.
        """
        conds = list(conds)
        if not conds:
            raise TwigError("Conditioning.cat needs at least one conditioning")
        first = conds[0]
        width = first.embeds.shape[2]
        for c in conds[1:]:
            if c.embeds.shape[2] != width:
                raise TwigError(
                    f"cannot batch conditionings of width {width} and {c.embeds.shape[2]} "
                    "(they come from different text encoders)"
                )
        n = max(c.seq_len for c in conds)
        embeds, masks = [], []
        for c in conds:
            e = c.embeds.to(device=first.embeds.device, dtype=first.embeds.dtype)
            m = c.mask.to(device=first.embeds.device, dtype=first.mask.dtype)
            if c.seq_len < n:
                e = torch.nn.functional.pad(e, (0, 0, 0, n - c.seq_len))
                m = torch.nn.functional.pad(m, (0, n - c.seq_len))
            embeds.append(e)
            masks.append(m)
        reports = tuple(r for c in conds for r in c.reports) if all(c.reports for c in conds) else ()
        return Conditioning(torch.cat(embeds, 0), torch.cat(masks, 0), reports)


# --------------------------------------------------------------------------------------------------
# Encoder


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# texts written after the instruction to find the tokens of its end that a prompt's first token may absorb
_PREFIX_PROBES = ("a", "A", "1", "中", ":", "-", "(", "\n", ".")


class _Prefix(NamedTuple):
    """The instruction prefix's run: its token ids, the model state that produced it (:meth:`TextEncoder._state`),
    its hidden states [1, P, C] and every layer's (keys, values) [1, kv_heads, P, head_dim]."""

    ids: tuple[int, ...]
    state: tuple
    hidden: Tensor
    layers: tuple[tuple[Tensor, Tensor], ...]


def kept_length(mask: Tensor) -> int:
    """1 + the last position that any row of an attention mask [B, T] keeps (right padding; at least 1): what a
    batch needs of its padded sequence (Gemma-2 here, the transformer's caption in ``encode_caption``)."""
    cols = mask.bool().any(0).nonzero()
    return int(cols[-1]) + 1 if len(cols) else 1


def _park(t: Tensor) -> Tensor:
    """Where the prefix's tensors wait between encodes: main memory. A host that moves the text encoder off its GPU
    (ComfyUI's offload, the CLI's one network at a time) then leaves none of its device memory behind; copying
    them over for each encode costs far less than the prefix's forward."""
    return t.to("cpu")


def _layered_cache():
    """transformers' ``DynamicCache`` when it has the per-layer form (``cache.layers[i].keys``) this module reads,
    else None (older transformers: prompts then run the full sequence)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: F401
    except ImportError:
        return None
    return DynamicCache


SETTINGS_FILE = "twig_text.json"


def folder_settings(folder: str | os.PathLike) -> dict:
    """Prompt-encoding settings a text-encoder folder may carry in ``twig_text.json``.

    ``{"instruction": [lines]}`` replaces Sana's instruction prefix (``[]`` = none; the demo model was trained
    without it); ``{"lowercase": true}`` lower-cases prompts. Absent file: Sana's defaults.
    """
    path = os.path.join(os.fspath(folder), SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TwigError(f"{path}: not readable JSON ({e})") from e
    out = {}
    if "instruction" in data:
        lines = data["instruction"]
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise TwigError(f"{path}: 'instruction' must be a list of strings")
        out["instruction"] = tuple(lines)
    if "lowercase" in data:
        out["lowercase"] = bool(data["lowercase"])
    return out


class TextEncoder:
    """Gemma-2 decoder + its tokenizer, producing Sana-style :class:`Conditioning`.

    ``model`` is a transformers ``Gemma2Model`` (a ``Gemma2ForCausalLM`` is unwrapped to its ``.model``);
    it is used as given (device, dtype, train/eval mode, attention implementation).
    ``lowercase=True`` lower-cases prompts before tokenizing, as diffusers' SanaPipeline does; the NVlabs
    reference code keeps the case, and so does Twig by default.
    ``instruction``: the lines written before positive prompts (Sana's by default).

    :meth:`encode` keeps the instruction prefix's keys and values on the encoder (``2 * layers * kv_heads *
    head_dim * prefix_tokens`` values in the model's dtype, plus the prefix's hidden states; in main memory, copied
    to the model's device for each encode, so an offloaded encoder leaves no device memory behind), made on
    first use and remade when what made it changes: the instruction or tokenizer (the prefix's token ids), the
    weights (each parameter's and buffer's identity, version counter, storage, dtype and device: ``to()``, an
    optimizer step, a LoRA merged into the weights), the layers' classes, runtime adapters
    (``twig_adapters``), train/eval mode and the attention implementation. A write that bypasses the version
    counters (``param.data.copy_``, or an in-place write to an inference tensor, which has none: ComfyUI loads
    under ``torch.inference_mode``) is not seen: call :meth:`forget_prefix` after one. The cache goes with the
    encoder (no global state).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        instruction: Sequence[str] | str | None = COMPLEX_HUMAN_INSTRUCTION,
        lowercase: bool = False,
    ):
        if getattr(model, "lm_head", None) is not None and hasattr(model, "model"):
            model = model.model  # causal LM wrapper -> decoder; its final norm is what Sana uses
        self.model = model
        self.tokenizer = tokenizer
        if instruction is None or isinstance(instruction, str):
            self.instruction = instruction or ""
        else:
            self.instruction = "\n".join(instruction)
        self.lowercase = lowercase
        self._prefix: _Prefix | None = None

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu", *, tokenizer_folder=None, **kwargs) -> "TextEncoder":
        """A local Gemma-2 folder (Hugging Face or a diffusers pipeline's ``text_encoder/`` + ``tokenizer/``) as
        :func:`twig_core.gemma.load_text_encoder` loads it; nothing is downloaded."""
        from .gemma import load_text_encoder

        return load_text_encoder(folder, dtype=dtype, device=device, tokenizer_path=tokenizer_folder, **kwargs)

    # -- properties --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TextEncoder":
        """Move (and optionally cast) the Gemma model in place; returns self."""
        self.model.to(device=device, dtype=dtype)
        self.forget_prefix()
        return self

    def forget_prefix(self) -> None:
        """Drop the instruction prefix's cached keys/values (the next :meth:`encode` makes them again)."""
        self._prefix = None

    # -- tokenization ------------------------------------------------------------------------------

    def _prepare(self, prompt: str) -> str:
        if not isinstance(prompt, str):
            raise TwigError(f"prompt must be a string, got {type(prompt).__name__}")
        prompt = prompt.strip()
        return prompt.lower() if self.lowercase else prompt

    def _ids(self, text: str) -> list[int]:
        # verbose=False: these counts tokenize the whole prompt on purpose; without it transformers warns that the
        # sequence is "longer than the specified maximum sequence length" although encode() truncates it
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _n_special(self) -> int:
        return len(self.tokenizer("", add_special_tokens=True, verbose=False)["input_ids"])

    def _total_length(self, max_length: int, use_instruction: bool) -> int:
        """Padded length of the tokenized sequence before selection."""
        if not (use_instruction and self.instruction):
            return max_length
        # instruction tokens counted with <bos>, as Sana counts them
        return len(self.tokenizer(self.instruction, add_special_tokens=True, verbose=False)["input_ids"]) + max_length - 2

    def _report(self, text: str, max_length: int, use_instruction: bool) -> TokenReport:
        if use_instruction and self.instruction:
            head = self._ids(self.instruction)
            full = self._ids(self.instruction + text)
            own = len(full) - _common_prefix(head, full)
        else:
            full = self._ids(text)
            own = len(full)
        room = self._total_length(max_length, use_instruction) - self._n_special()
        dropped = max(0, len(full) - room)
        return TokenReport(prompt_tokens=own, kept_tokens=max(0, own - dropped))

    def truncation_warnings(self, prompt: str, negative: str | None, max_length: int = SANA_MAX_LENGTH,
                            setting: str = "--max-length") -> list[str]:
        """One line per prompt (positive, then negative unless it is None) that ``max_length`` would cut, with
        counts; ``setting`` names the knob that raises the budget."""
        lines = []
        for label, text, instruction in (("prompt", prompt, True), ("negative prompt", negative, False)):
            if text is None:
                continue
            r = self.token_report(text, max_length, instruction)
            if r.truncated:
                lines.append(f"{label} has {r.prompt_tokens} tokens but only {r.kept_tokens} fit in {max_length}; "
                             f"{r.dropped_tokens} dropped from the end — raise {setting} (up to {MAX_LENGTH_LIMIT}) "
                             f"or shorten the prompt")
        return lines

    def count_tokens(self, prompt: str, use_instruction: bool = True) -> int:
        """Tokens the prompt itself occupies, without ``<bos>`` and without the instruction.

        With ``use_instruction`` the prompt is counted as tokenized after the instruction (its first
        token may absorb the instruction's trailing space), as :meth:`encode` sees it.
        """
        return self.token_report(prompt, SANA_MAX_LENGTH, use_instruction).prompt_tokens

    def token_report(self, prompt: str, max_length: int = SANA_MAX_LENGTH, use_instruction: bool = True) -> TokenReport:
        """How many of the prompt's tokens :meth:`encode` would keep, without running the model."""
        max_length = check_max_length(max_length)
        return self._report(self._prepare(prompt), max_length, use_instruction)

    def tokenize(
        self, prompts: Sequence[str] | str, max_length: int = SANA_MAX_LENGTH, use_instruction: bool = True
    ) -> tuple[Tensor, Tensor, tuple[TokenReport, ...]]:
        """Token ids [B, T] and attention mask [B, T] exactly as fed to Gemma (before selection)."""
        max_length = check_max_length(max_length)
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [self._prepare(p) for p in prompts]
        if not prompts:
            raise TwigError("no prompt to encode")
        with_instruction = bool(use_instruction and self.instruction)
        texts = [self.instruction + p for p in prompts] if with_instruction else prompts
        total = self._total_length(max_length, use_instruction)
        if total < max_length:
            raise TwigError(f"the instruction is too short ({total - max_length + 2} tokens) to select from")

        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "right"
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=total,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        reports = tuple(self._report(p, max_length, use_instruction) for p in prompts)
        return batch["input_ids"], batch["attention_mask"], reports

    # -- encoding ----------------------------------------------------------------------------------

    def forward(
        self, prompts: Sequence[str] | str, max_length: int = SANA_MAX_LENGTH, use_instruction: bool = True
    ) -> Conditioning:
        """:meth:`encode` with gradients (for training the text encoder): the whole sequence runs, no prefix cache;
        no finiteness check."""
        ids, mask, reports = self.tokenize(prompts, max_length, use_instruction)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self._select(self.model(input_ids=ids, attention_mask=mask, use_cache=False)[0], mask, max_length,
                            reports)

    @staticmethod
    def _select(hidden: Tensor, mask: Tensor, max_length: int, reports) -> Conditioning:
        """<bos> + the last max_length - 1 positions of the hidden states and the mask."""
        n = hidden.shape[1]
        keep = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(n - max_length + 1, n)]).to(hidden.device)
        return Conditioning(hidden.index_select(1, keep), mask.index_select(1, keep), reports)

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str] | str, max_length: int = SANA_MAX_LENGTH, use_instruction: bool = True
    ) -> Conditioning:
        """Encode prompts into a [B, max_length, C] conditioning (model dtype, model device).

        Positive prompts: ``use_instruction=True`` (Sana's behaviour). Negative prompts:
        ``use_instruction=False``. The empty prompt is valid on both paths: Sana's own default negative
        is "", and an empty positive prompt (an unconditional-looking image steered only by the
        instruction) is accepted too, as Sana accepts it.
        Truncation is reported in ``Conditioning.reports`` / ``Conditioning.warnings()``.
        With the instruction, its prefix runs once per encoder (see the class docstring).

        Gemma-2 runs only up to the last token any prompt of the batch keeps: it is causal and the padding comes
        last, so no kept token sees the padding, and the transformer masks the padded positions out of
        cross-attention (diffusers and the NVlabs code alike). Those positions hold zeros, where the whole
        forward (:meth:`forward`, diffusers' ``encode_prompt``) leaves Gemma's states of the pad tokens; the kept
        ones are the same. The empty negative prompt thus costs one token instead of ``max_length``.
        """
        ids, mask, reports = self.tokenize(prompts, max_length, use_instruction)
        ids, mask = ids.to(self.device), mask.to(self.device)
        total, used = ids.shape[1], kept_length(mask)
        ids, kept = ids[:, :used], mask[:, :used]
        hidden = self._run_after_prefix(ids, kept) if use_instruction and self.instruction else None
        if hidden is None:
            hidden = self.model(input_ids=ids, attention_mask=kept, use_cache=False)[0]
        hidden = hidden.masked_fill(~kept.bool()[..., None], 0.0)
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, total - used))
        cond = self._select(hidden, mask, max_length, reports)
        if not torch.isfinite(cond.embeds).all():
            raise TwigError(
                f"Gemma-2 produced non-finite values in {cond.embeds.dtype}; load the text encoder in "
                "bfloat16 or float32 (Gemma-2 overflows in float16)"
            )
        return cond

    # -- the instruction prefix's cache ------------------------------------------------------------

    def _prefix_ids(self) -> tuple[int, ...]:
        """<bos> + the instruction's tokens that every instruction + prompt tokenization starts with: its last
        token dropped (the prompt's first token usually absorbs the trailing space) and cut further to what it
        shares with the instruction followed by a few different texts. Each row is still checked before use."""
        def ids(text):
            return list(self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])

        head = ids(self.instruction)[:-1]
        for probe in _PREFIX_PROBES:
            head = head[:_common_prefix(head, ids(self.instruction + probe))]
        return tuple(head)

    def _state(self) -> tuple:
        """What the prefix's keys/values depend on besides its token ids (see the class docstring)."""
        m = self.model
        state = [m.training, getattr(m.config, "_attn_implementation", None)]
        for module in m.modules():
            adapters = getattr(module, "twig_adapters", None) or ()
            state.append((type(module), tuple((id(a), a.strength) for a in adapters)))
        for t in itertools.chain(m.parameters(), m.buffers()):
            # inference tensors (made under torch.inference_mode, as ComfyUI loads) keep no version counter
            version = -1 if t.is_inference() else t._version
            state.append((id(t), version, t.data_ptr(), t.dtype, t.device))
        return tuple(state)

    def _cache_argument(self) -> str:
        names = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in names else "past_key_values"  # transformers 5.x renamed it

    def _run_after_prefix(self, ids: Tensor, mask: Tensor) -> Tensor | None:
        """Hidden states [B, T, C] of the full sequence with the instruction prefix's keys/values reused, or None
        where the full forward must run: older transformers, a row that does not start with the prefix, or a
        sequence reaching Gemma-2's sliding window (only the full forward's mask applies the window)."""
        make_cache = _layered_cache()
        if make_cache is None:
            return None
        prefix = self._prefix_ids()
        n, total = len(prefix), ids.shape[1]
        window = getattr(self.model.config, "sliding_window", None)
        if not 0 < n < total or (window and total >= window):
            return None
        expected = torch.tensor(prefix, dtype=ids.dtype, device=ids.device)
        if not bool((ids[:, :n] == expected).all()) or not bool(mask[:, :n].bool().all()):
            return None
        state = self._state()
        if self._prefix is None or self._prefix.ids != prefix or self._prefix.state != state:
            self._prefix = None  # free the old one before making the new one
            cache = make_cache()
            out = self.model(input_ids=expected[None], attention_mask=torch.ones_like(expected)[None],
                             use_cache=True, **{self._cache_argument(): cache})
            layers = tuple((_park(layer.keys), _park(layer.values)) for layer in cache.layers)
            self._prefix = _Prefix(prefix, state, _park(out[0]), layers)
            del cache, out
        b, dev = ids.shape[0], ids.device
        cache = make_cache()
        for i, (k, v) in enumerate(self._prefix.layers):  # a fresh cache per call: a forward extends it
            cache.update(k.to(dev).expand(b, -1, -1, -1), v.to(dev).expand(b, -1, -1, -1), i)
        rest = self.model(input_ids=ids[:, n:], attention_mask=mask, use_cache=True,
                          **{self._cache_argument(): cache})[0]
        return torch.cat([self._prefix.hidden.to(dev).expand(b, -1, -1), rest], dim=1)
