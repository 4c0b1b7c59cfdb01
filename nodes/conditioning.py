"""Prompt encoding node: positive and negative prompt -> two TWIG_CONDITIONING outputs and a token report."""

from __future__ import annotations

import torch

from . import host
from .common import CATEGORY, CONDITIONING, TEXT_ENCODER, NodeError, log, node_errors


def token_report(label: str, cond, max_tokens: int) -> tuple[str, str | None]:
    """One line about a prompt's length, and a warning line when it was truncated."""
    if cond.reports:
        r = cond.reports[0]
        line = f"{label}: {r.prompt_tokens} tokens (budget {max_tokens})"
        if r.truncated:
            warning = (f"{label} prompt has {r.prompt_tokens} tokens but only {r.kept_tokens} fit in {max_tokens}; "
                       f"{r.dropped_tokens} dropped from the end — raise max_tokens on the text encoder loader "
                       f"(up to 1200) or shorten the prompt")
            return line + f", TRUNCATED to {r.kept_tokens}", warning
        return line, None
    return f"{label}: {cond.token_counts()[0]} positions", None


class TwigTextEncode:
    DESCRIPTION = ("Encodes a positive and a negative prompt (English or Chinese) with Gemma-2 the way Sana does: "
                   "the positive prompt gets Sana's instruction prefix, the negative prompt does not.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER,),
                "positive": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": True, "tooltip": "What to draw (English or Chinese)."}),
                "negative": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": True, "tooltip": "What to avoid; empty is Sana's default."}),
                "unload_after": ("BOOLEAN", {"default": False, "tooltip": "Release the text encoder from GPU and RAM after encoding (it loads again when a prompt changes)."}),
            }
        }

    RETURN_TYPES = (CONDITIONING, CONDITIONING, "STRING")
    RETURN_NAMES = ("positive", "negative", "token_report")
    OUTPUT_TOOLTIPS = ("Positive conditioning for the Twig sampler.", "Negative conditioning for the Twig sampler.",
                       "Token counts of both prompts, and truncation warnings.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @node_errors("Twig Text Encode")
    def encode(self, text_encoder, positive, negative="", unload_after=False):
        if not hasattr(text_encoder, "model") or not hasattr(text_encoder, "max_tokens"):
            raise NodeError(f"Twig Text Encode: text_encoder input must come from Twig Text Encoder Loader, got {type(text_encoder).__name__}")
        n = text_encoder.max_tokens
        host.check_interrupt()
        try:
            with torch.no_grad():
                te = text_encoder.model.get()
                pos = te.encode([positive], max_length=n, use_instruction=True)
                host.check_interrupt()
                neg = te.encode([negative], max_length=n, use_instruction=False)
            pos, neg = pos.to("cpu"), neg.to("cpu")  # conditioning is small; the sampler moves it to its device
        finally:
            if unload_after:
                text_encoder.model.release()
        lines, warnings = [], []
        for label, c in (("positive", pos), ("negative", neg)):
            line, warning = token_report(label, c, n)
            lines.append(line)
            if warning:
                warnings.append(warning)
                log.warning("[Twig] %s", warning)
        report = "\n".join(lines + [f"WARNING: {w}" for w in warnings])
        return {"ui": {"text": [report]}, "result": (pos, neg, report)}
