"""``expand``: a few tags and/or a sentence in, a long, detailed prompt out (TIPO text presampling).

Steps: take the user's ``(word:1.2)`` weights out; sort the tags into TIPO's categories; plan the passes
(``request.plan``); for each pass write the request, let the model continue it (seeded, see ``run_steps``;
a retry feeds the previous answer back in with the next seed) until the written section reaches
its length target or ``max_retries`` is used up; clean each answer (``request.postprocess``); put the
weights back and write both the expanded and the user's own prompt with the format template.

Text TIPO cannot read is passed through: a sentence in Chinese (or Japanese/Korean) is not sent to the
model, which then works from the tags alone and writes no description; the sentence itself is the
``extended`` text of both prompts. Tags in those scripts are kept, after the user's other tags, but not
sent either. With no English tags left to expand, nothing is generated (``notes`` says so).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Callable

from ..errors import TwigError
from .model import Sampling, TipoModel
from .request import (DEFAULT_FORMAT, FORMAT_PRESETS, Plan, Step, check_length, format_prompt, long_enough,
                      parse_output, plan, postprocess, request_text, resolve_format, single_task_plan)
from .tags import CATEGORIES, TAG_CATEGORIES, BanList, TagLists, Weighted, has_cjk, one_line

AUTO = "auto"


@dataclass
class Pass:
    """One model call: the task, seed, request, full text (request + continuation) and token counts."""

    task: str | None
    seed: int
    request: str
    output: str
    prompt_tokens: int
    new_tokens: int
    long_enough: bool


@dataclass
class TipoResult:
    prompt: str  # the expanded prompt, formatted
    user_prompt: str  # the user's own input, formatted the same way
    parts: dict  # categories of the expanded prompt (weights applied), see CATEGORIES
    user_parts: dict  # categories of the user's input
    unformatted: str  # the user's tags, the new tags, then the description on its own line
    passes: list[Pass] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def parts_json(self) -> str:
        return json.dumps({"tipo": self.parts, "user": self.user_parts,
                           "passes": len(self.passes), "notes": self.notes}, ensure_ascii=False, indent=1)


def _categories(parsed: dict) -> dict:
    """Only the prompt categories: tags as de-duplicated lists, texts as strings."""
    out = {}
    for cat in CATEGORIES:
        value = parsed.get(cat)
        if cat in TAG_CATEGORIES:
            tags = list(value) if isinstance(value, (list, tuple)) else ([value] if value else [])
            out[cat] = list(dict.fromkeys(t for t in tags if t))
        else:
            out[cat] = value if isinstance(value, str) else ", ".join(value or [])
    return out


def _insert_after_user_tags(general: list[str], user_tags: list[str], extra: list[str]) -> list[str]:
    """``extra`` placed right after the last of the user's own tags in ``general``."""
    if not extra:
        return general
    last = max((i for i, t in enumerate(general) if t in set(user_tags)), default=-1)
    return general[: last + 1] + [t for t in extra if t not in general] + general[last + 1:]


def run_steps(model: TipoModel, p: Plan, *, lists: TagLists, ban: BanList, seed: int, sampling: Sampling,
              max_retries: int = 10, max_same_output: int = 5,
              callback: Callable[[int], None] | None = None) -> tuple[dict, list[Pass]]:
    """Run a plan's passes; each pass's cleaned answer is the next pass's input. Returns the last
    pass's categories (cleaned) and the log of every model call.

    Seeds follow TIPO's own tools, so a seed gives the text they give with the same model and settings:
    a Python ``random.Random(seed)`` draws each step's base seed ``s`` (``randint(0, 2**32)``); try ``i``
    of the step samples with torch seed ``(s + i) mod 2**32`` and shuffles its new tags with
    ``random.Random((s + i) mod 2**32)``, and the next step's base seed is drawn from that same stream.
    """
    general, nl = p.general, p.nl
    parsed: dict = {}
    passes: list[Pass] = []
    stream = random.Random(int(seed))
    for n, step in enumerate(p.steps):
        base = stream.randint(0, 2**32)
        parsed, step_passes, stream = _run_with_retry(
            model, p.meta, general, nl, step, lists=lists, ban=ban, base_seed=base, sampling=sampling,
            max_retries=max_retries, max_same_output=max_same_output, callback=callback)
        passes += step_passes
        if n < len(p.steps) - 1:
            if "generated" in parsed and nl:
                parsed["extended"] = parsed.pop("generated")
            nl = (parsed.get("generated") or parsed.get("extended") or nl).strip()
            general = ", ".join(parsed.get("special", []) + parsed.get("general", []))
    return parsed, passes


def _run_with_retry(model, meta, general, nl, step: Step, *, lists, ban, base_seed, sampling, max_retries,
                    max_same_output, callback):
    """One step: try with seeds base_seed + 0, 1, ... until the written section is long enough, at most
    ``max_retries`` retries, or ``max_same_output`` repeats of an earlier answer in a row. Each retry starts
    from the previous answer. Returns (categories, passes, the random stream of the last try)."""
    written = step.task.split("_to_")[-1] if step.task else "tag"
    seen: set[str] = set()
    same = 0
    passes: list[Pass] = []
    parsed: dict = {}
    rng = random.Random(base_seed % 2**32)
    for i in range(max(0, int(max_retries)) + 1):
        pass_seed = (base_seed + i) % 2**32
        req = request_text(meta, general, nl, step.task, step.length, step.expand)
        gen = model.generate(req, pass_seed, sampling, step_callback=callback)
        rng = random.Random(pass_seed)
        parsed = postprocess(parse_output(gen.text, lists), general, nl, step.task, step.length, ban, rng)
        target = written
        if target == "long" and "generated" not in parsed:
            target = "short"  # the description became the extension of the user's sentence
        ok = long_enough(parsed, target, step.length)
        passes.append(Pass(step.task, pass_seed, req, gen.text, gen.prompt_tokens, gen.new_tokens, ok))
        if ok:
            break
        if gen.text in seen:
            same += 1
            if same >= max_same_output:
                break
        else:
            same = 0
            seen.add(gen.text)
        nl = (parsed.get("extended", "") or parsed.get("generated", "") or nl).strip()
        general = ", ".join(parsed.get("special", []) + parsed.get("general", []))
    return parsed, passes, rng


def expand(model: TipoModel | None, tags: str = "", nl_prompt: str = "", *, ban_tags: str = "",
           format: str = DEFAULT_FORMAT, width: int = 1024, height: int = 1024, seed: int = 0,
           tag_length: str = "long", nl_length: str = "long", task: str = AUTO,
           sampling: Sampling | None = None, lists: TagLists | None = None, max_retries: int = 10,
           callback: Callable[[int], None] | None = None) -> TipoResult:
    """Expand ``tags`` / ``nl_prompt`` with a TIPO model (``model`` None: only format the input).

    ``format``: a template with ``<|category|>`` placeholders or a preset name (``FORMAT_PRESETS``).
    ``task``: "auto" (TIPO's plan for this input) or one task of ``request.TASKS`` run once ("none":
    extend the tags). ``seed``: the same seed gives the same text (see ``run_steps``). ``callback(n)``
    runs after every generated token (raise from it to cancel).

    Raises TwigError when both inputs are empty (give only a rating or quality tag to let TIPO write a
    prompt from nothing).
    """
    if not (tags or "").strip() and not (nl_prompt or "").strip():
        raise TwigError("nothing to expand: write a few tags or a sentence (for a prompt written from "
                        "nothing, give just a rating or quality tag such as 'general' or 'masterpiece')")
    tag_length, nl_length = check_length("tag_length", tag_length), check_length("nl_length", nl_length)
    if width <= 0 or height <= 0:
        raise TwigError(f"width and height must be positive, got {width}x{height}")
    lists = lists or TagLists.builtin()
    ban = BanList.parse(ban_tags)
    template = resolve_format(format)
    notes: list[str] = []

    weighted = Weighted.from_input(tags or "", nl_prompt or "")
    escape = weighted.any  # brackets in tags are escaped only for prompts that use weights
    foreign_tags = [t for t in weighted.tags if has_cjk(t)]
    model_tags = [t for t in weighted.tags if not has_cjk(t)]
    user_nl = one_line(weighted.text)
    nl_passthrough = has_cjk(user_nl)
    model_nl = "" if nl_passthrough else user_nl
    if model is not None and nl_passthrough:
        notes.append("the sentence is not English: passed through unchanged; TIPO only sees the tags")
    if model is not None and foreign_tags:
        notes.append(f"{len(foreign_tags)} non-English tag(s) passed through unchanged")

    tag_map = lists.split(model_tags, prefixes=True)
    extra_nl = (not user_nl and "<|extended|>" in template) or "<|generated|>" in template
    if task in (AUTO, None, ""):
        p = plan(tag_map, model_nl, extra_nl=extra_nl, tag_length=tag_length, nl_length=nl_length)
    else:
        p = single_task_plan(tag_map, model_nl, None if task in ("none", "None") else task,
                             tag_length=tag_length, nl_length=nl_length)
    p.meta["aspect_ratio"] = f"{width / height:.1f}"

    user = _categories(parse_output(
        request_text(p.meta, p.general, model_nl, "short_to_tag_to_long", tag_length, True, gen_meta=True), lists))
    user_general_tags = list(user["general"])
    if nl_passthrough:
        user["extended"] = user_nl
    user["general"] = _insert_after_user_tags(user["general"], user_general_tags, foreign_tags)

    passes: list[Pass] = []
    if model is None:
        parts = {k: (list(v) if isinstance(v, list) else v) for k, v in user.items()}
    elif nl_passthrough and not p.general.strip():
        notes.append("no English tags to expand: nothing generated")
        parts = {k: (list(v) if isinstance(v, list) else v) for k, v in user.items()}
    else:
        parsed, passes = run_steps(model, p, lists=lists, ban=ban, seed=int(seed), sampling=sampling or Sampling(),
                                   max_retries=max_retries, callback=callback)
        parts = _categories(parsed)
        if nl_passthrough:
            parts["extended"] = user_nl
        parts["general"] = _insert_after_user_tags(parts["general"], user_general_tags, foreign_tags)

    unformatted = _unformatted(parts, user, tags or "", weighted, escape)
    user_unformatted = "\n".join(x for x in ((tags or "").strip(), (nl_prompt or "").strip()) if x)
    shown, user_shown = _weights(parts, weighted, escape), _weights(user, weighted, escape)
    return TipoResult(
        prompt=format_prompt(shown, template),
        user_prompt=format_prompt(user_shown, template),
        parts=shown,
        user_parts=user_shown,
        unformatted=unformatted if model is not None else user_unformatted,
        passes=passes,
        notes=notes,
    )


def _weights(parts: dict, weighted: Weighted, escape: bool) -> dict:
    out = {}
    for k, v in parts.items():
        out[k] = weighted.apply_tags(v, escape) if isinstance(v, list) else weighted.apply_text(v, escape)
    return out


def _unformatted(parts: dict, user: dict, tags: str, weighted: Weighted, escape: bool) -> str:
    """The user's tags as typed, then the new tags, then the description on its own line."""
    new_tags = [t for cat in TAG_CATEGORIES for t in parts.get(cat, []) if t not in user.get(cat, [])]
    text = parts.get("extended") or parts.get("generated") or ""
    line = ", ".join(x for x in [tags.strip().strip(",")] + weighted.apply_tags(new_tags, escape) if x)
    return "\n".join(x for x in (line, weighted.apply_text(text, escape)) if x)


__all__ = ["expand", "run_steps", "TipoResult", "Pass", "FORMAT_PRESETS", "DEFAULT_FORMAT", "AUTO"]
