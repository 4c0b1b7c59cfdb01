"""TIPO's text format: the request a TIPO model continues, reading its answer back, and the final prompt.

A request is a few ``key: value`` lines::

    meta: absurdres                      (only the metadata that has a value)
    rating: general
    artist: ...
    characters: ...
    copyrights: ...
    quality: masterpiece
    aspect_ratio: 1.5                    (width / height, one decimal)
    target: <|long|> <|tag_to_long|>     (length target, then the task)
    tag: 1girl, solo, red hair           (the sections the task reads, in task order)
    long:                                (the section the model is to write)

The task names its sections in order (``tag_to_long``: read ``tag``, write ``long``); without a task TIPO
extends the tag list. ``short`` holds a short sentence to be extended, ``long`` a full description. When the
model is to *extend* the last section, the request ends inside that section (no trailing ``key:`` line).

The model's answer is the request continued; parsing reads the sections back (``tag`` sorted into
categories, ``short`` -> ``extended``, ``long`` -> ``generated``), post-processing keeps the user's tags
first, drops banned tags, removes duplicates and caps lengths, and ``format_prompt`` writes the categories
into a user template with ``<|category|>`` placeholders.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import TwigError
from .tags import CATEGORIES, BanList, TagLists

LENGTHS = ("very_short", "short", "long", "very_long")
# Length targets: at least / at most this many tags, and sentences, for each length setting.
TAG_MIN = {"very_short": 6, "short": 18, "long": 36, "very_long": 54}
TAG_MAX = {"very_short": 18, "short": 36, "long": 54, "very_long": 72}
NL_MIN = {"very_short": 1, "short": 2, "long": 4, "very_long": 8}
NL_MAX = {"very_short": 2, "short": 4, "long": 8, "very_long": 10000}

# Tasks: the sections read, then the one(s) written. None (shown as "tag expansion") extends the tag list.
TASKS = ("tag_to_long", "long_to_tag", "short_to_tag", "short_to_tag_to_long", "tag_to_short",
         "tag_to_short_to_long", "tag_to_long_to_short")
SECTION_NAMES = {"short": "extended", "long": "generated"}

FORMAT_PRESETS = {
    "tags first": (
        "<|special|>, <|characters|>, <|copyrights|>,\n<|artist|>,\n\n<|general|>,\n\n<|extended|>.\n\n"
        "<|quality|>, <|meta|>, <|rating|>"
    ),
    "natural language first": (
        "<|special|>, <|characters|>, <|copyrights|>,\n<|artist|>,\n\n<|extended|>.\n\n<|general|>,\n\n"
        "<|quality|>, <|meta|>, <|rating|>"
    ),
    "natural language only": "<|extended|>.",
    "tags only": (
        "<|special|>, <|characters|>, <|copyrights|>,\n<|artist|>,\n\n<|general|>,\n\n"
        "<|quality|>, <|meta|>, <|rating|>"
    ),
    "both + generated": (
        "<|special|>, <|characters|>, <|copyrights|>,\n<|artist|>,\n\n<|generated|>.\n\n<|general|>,\n\n"
        "<|extended|>.\n\n<|quality|>, <|meta|>, <|rating|>"
    ),
}
DEFAULT_FORMAT = "tags first"


def check_length(name: str, value: str) -> str:
    value = (value or "long").strip().replace(" ", "_")
    if value not in LENGTHS:
        raise TwigError(f"{name} must be one of {', '.join(LENGTHS)}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Planning and writing requests


@dataclass(frozen=True)
class Step:
    """One generation pass: the task (None = extend the tags), its length target, and whether the model
    continues the last input section (True) or writes a new one (False)."""

    task: str | None
    length: str
    expand: bool


@dataclass
class Plan:
    meta: dict[str, str | None]  # ordered metadata lines (None / "" = not written)
    general: str  # the general (and head-count) tags, comma-joined
    nl: str  # the sentence(s), one line
    steps: list[Step]


def meta_lines(tag_map: Mapping[str, Sequence[str]], add_quality: bool = True) -> dict[str, str | None]:
    """The metadata lines of a request, in TIPO's order."""
    def join(cat):
        return ", ".join(tag_map.get(cat, [])).strip()

    meta: dict[str, str | None] = {
        "meta": join("meta"),
        "rating": join("rating") or None,
        "artist": join("artist") or None,
        "characters": join("characters") or None,
        "copyrights": join("copyrights") or None,
    }
    if add_quality:
        meta["quality"] = join("quality")
    return meta


def general_line(tag_map: Mapping[str, Sequence[str]]) -> str:
    return ", ".join(list(tag_map.get("special", [])) + list(tag_map.get("general", []))).strip().strip(",")


def plan(tag_map: Mapping[str, Sequence[str]], nl: str = "", *, expand_tags: bool = True,
         expand_prompt: bool = True, extra_nl: bool = True, tag_first: bool = True,
         tag_length: str = "long", nl_length: str = "long", add_quality: bool = True) -> Plan:
    """The passes TIPO runs for this input (its automatic mode).

    - nothing given: write tags from scratch (then a description from them);
    - tags only: extend the tags (then a description);
    - a sentence only: tags from the sentence, extending it (then tags + sentence -> description);
    - both: tags from the sentence (extending the given tags), then the description from the tags
      (``tag_first``), or the other way round.
    ``extra_nl`` adds the final "description" pass (in brackets above).
    """
    tag_length, nl_length = check_length("tag_length", tag_length), check_length("nl_length", nl_length)
    general = general_line(tag_map)
    has_tags, has_nl = bool(general.strip()), bool(nl.strip())
    steps: list[Step] = []
    if not has_tags and not has_nl:
        steps = [Step(None, tag_length, True)]
        last = Step("tag_to_long", nl_length, True)
    elif not has_nl:
        steps = [Step(None, tag_length, True)] if expand_tags else []
        last = Step("tag_to_long", nl_length, False)
    elif not has_tags:
        steps = [Step("long_to_tag", tag_length, expand_prompt)]
        last = Step("short_to_tag_to_long", nl_length, False)
    elif not expand_tags and not expand_prompt:
        last = Step("short_to_tag_to_long", nl_length, False)
    elif expand_tags and not expand_prompt:
        steps = [Step("short_to_tag", tag_length, True), Step("short_to_tag_to_long", nl_length, False)]
        last = Step("short_to_tag_to_long", nl_length, False)
    elif expand_prompt and not expand_tags:
        steps = [Step("tag_to_long", tag_length, True), Step("tag_to_short_to_long", nl_length, False)]
        last = Step("tag_to_short_to_long", nl_length, False)
    elif tag_first:
        steps = [Step("short_to_tag", tag_length, True), Step("tag_to_long", nl_length, True)]
        last = Step("short_to_tag_to_long", nl_length, False)
    else:
        steps = [Step("tag_to_long", nl_length, True), Step("long_to_tag", tag_length, True)]
        last = Step("tag_to_short_to_long", nl_length, False)
    if extra_nl:
        steps.append(last)
    return Plan(meta_lines(tag_map, add_quality), general, nl, steps)


def single_task_plan(tag_map: Mapping[str, Sequence[str]], nl: str = "", task: str | None = None, *,
                     tag_length: str = "long", nl_length: str = "long", add_quality: bool = True) -> Plan:
    """One pass of the given task (None = extend the tags); the length target is the tag length when
    the task ends in tags, else the text length."""
    if task in ("None", "", "tag expansion"):
        task = None
    if task is not None and task not in TASKS:
        raise TwigError(f"unknown TIPO task {task!r}; choose one of {', '.join(TASKS)} or none")
    tag_length, nl_length = check_length("tag_length", tag_length), check_length("nl_length", nl_length)
    length = nl_length if task is not None and not task.endswith("to_tag") else tag_length
    return Plan(meta_lines(tag_map, add_quality), general_line(tag_map), nl, [Step(task, length, True)])


def request_text(meta: Mapping[str, str | None], general: str, nl: str, task: str | None,
                 length: str | None, expand: bool, gen_meta: bool = False) -> str:
    """The request for one pass, in the model's own format (see the module docstring)."""
    lines = [f"{key}: {value}" for key, value in meta.items() if value]
    target = " ".join(
        t for t in (f"<|{length}|>" if length else "", f"<|{task}|>" if task else "",
                    "<|gen_meta|>" if gen_meta else "") if t
    )
    lines.append(f"target: {target}")
    sections = {"tag": general}
    if nl:
        sections["short" if task is not None and "short" in task else "long"] = nl
    order = task.split("_to_") if task else ["tag"]
    for i, key in enumerate(order):
        value = sections.get(key, "")
        if value.strip():
            lines.append(f"{key}: {value}")
        elif i < len(order) - 1:
            lines.append(f"{key}: ")
    text = "\n".join(lines) + "\n"
    return text.strip() if expand else text + f"{order[-1]}:"


# --------------------------------------------------------------------------------------------------
# Reading answers


_HEADER = re.compile(r"([^:\n]+):(.*)")


def sections(text: str) -> list[tuple[str, str]]:
    """``key: value`` sections of a TIPO text; a line without its own ``key:`` continues the section
    above it. Keys and values are stripped; lines before the first key are ignored."""
    found: list[list[str]] = []
    for line in text.split("\n"):
        m = _HEADER.match(line)
        if m:
            found.append([m.group(1), m.group(2)])
        elif found:
            found[-1][1] += "\n" + line
    return [(k.strip(), v.strip()) for k, v in found]


def _strip_markers(text: str) -> str:
    text = text.strip()
    while text.startswith("<s>"):
        text = text[3:].lstrip()
    while text.endswith("</s>"):
        text = text[:-4].rstrip()
    return text.strip()


def parse_output(text: str, lists: TagLists) -> dict:
    """Categories of a TIPO text (a request or a model's answer).

    Tag categories are lists; ``extended`` (from ``short``) and ``generated`` (from ``long``) are strings;
    other sections (``target``, ``aspect_ratio``) are kept as lists. The first section of each kind
    wins; tags found in the ``tag`` section are added to the metadata lines' categories.
    """
    out: dict = {}
    for key, value in sections(_strip_markers(text)):
        name = SECTION_NAMES.get(key, key)
        if name in out:
            continue
        if key == "tag":
            tags = [t.strip() for t in value.split(",") if t.strip()]
            for cat, found in lists.split(tags).items():
                found = [t for t in found if t]
                if cat in out:
                    if not isinstance(out[cat], list):
                        out[cat] = [out[cat]]
                    out[cat].extend(found)
                else:
                    out[cat] = found
            out["tag"] = tags
        elif key in SECTION_NAMES:
            if value and value != "<|empty|>":
                out[name] = value
        else:
            out[name] = [t.strip() for t in value.split(",") if t.strip()]
    return out


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in (text or "").split(".") if s.strip()]


def _dedupe(items):
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def postprocess(parsed: dict, general: str, nl: str, task: str | None, length: str,
                ban: BanList | None = None, rng: random.Random | None = None) -> dict:
    """Clean one pass's parsed answer (in place; returned).

    Sections the task did not ask for are dropped; a generated description becomes the extension of the
    user's sentence when that has none; banned tags leave every tag category; the user's tags come first
    (in the answer's order) and the new ones follow, shuffled with ``rng``; new sentences keep the last in
    place; the user's last sentence is replaced by its extension when the answer extends it; tags and
    sentences are capped at the length target's maximum and de-duplicated.
    """
    rng = rng or random.Random(0)
    if task is None:
        parsed.pop("extended", None)
        parsed.pop("generated", None)
    else:
        if "long" not in task:
            parsed.pop("generated", None)
        if "short" not in task:
            parsed.pop("extended", None)
    if "generated" in parsed and nl and not parsed.get("extended", "").strip():
        parsed["extended"] = parsed.pop("generated")

    if ban:
        for key, value in list(parsed.items()):
            if isinstance(value, list):
                parsed[key] = ban.filter(value)

    user_tags = {t.strip() for t in general.split(",")}
    user_sentences = _sentences(nl)
    answer_general = parsed.get("general", [])
    kept = [t for t in answer_general if t in user_tags]
    new = [t for t in answer_general if t not in user_tags]
    rng.shuffle(new)

    new_sentences = [s for s in _sentences(parsed.get("extended", "")) if s not in user_sentences]
    if new_sentences and user_sentences and user_sentences[-1] in new_sentences[0]:
        user_sentences[-1] = new_sentences.pop(0)
    if new_sentences:
        head = new_sentences[:-1]
        rng.shuffle(head)
        new_sentences = head + new_sentences[-1:]

    if len(kept) + len(new) > TAG_MAX[length]:
        new = new[: max(TAG_MAX[length] - len(kept), 0)]
    if len(user_sentences) + len(new_sentences) > NL_MAX[length]:
        new_sentences = new_sentences[: max(NL_MAX[length] - len(user_sentences), 0)]
    generated = []
    if "generated" in parsed:
        generated = [s for s in _sentences(parsed["generated"]) if s not in user_sentences][: NL_MAX[length]]

    parsed["general"] = _dedupe(kept + new)
    parsed["extended"] = ". ".join(_dedupe(user_sentences + new_sentences))
    if generated:
        parsed["generated"] = ". ".join(_dedupe(generated))
    return parsed


def long_enough(parsed: Mapping, written: str, length: str) -> bool:
    """Whether the section a pass wrote reached the length target's minimum (``written``: "tag",
    "short" or "long"; empty text counts as zero sentences)."""
    if written == "tag":
        n, lo = len(parsed.get("special", [])) + len(parsed.get("general", [])), TAG_MIN[length]
    else:
        n, lo = len(_sentences(parsed.get("extended" if written == "short" else "generated", ""))), NL_MIN[length]
    return lo <= n <= 1000


# --------------------------------------------------------------------------------------------------
# Formatting


_PLACEHOLDER = re.compile(r"<\|([A-Za-z_]+)\|>([,.])?")
_ENDS_SENTENCE = tuple(".!?。！？…")


def resolve_format(fmt: str) -> str:
    """A preset's template by name, or ``fmt`` itself."""
    return FORMAT_PRESETS.get((fmt or "").strip(), fmt or "")


def format_prompt(parts: Mapping, fmt: str) -> str:
    """Write ``parts`` into the template ``fmt`` (or a preset name).

    ``<|category|>`` is replaced by the category's tags joined with ", " (or its text); an empty or unknown
    category disappears together with the "," or "." written right after it. ``<|extended|>`` falls back
    to the generated description when there is no extension and the template has no ``<|generated|>``.
    A "." after text that already ends a sentence is not doubled. Spaces are tidied, lines left with
    nothing but punctuation are dropped, at most one empty line is kept in a row, and the result has no
    leading or trailing commas.
    """
    fmt = resolve_format(fmt)
    values = dict(parts)
    if not values.get("extended") and "<|generated|>" not in fmt:
        values["extended"] = values.get("generated", "")

    def fill(m: re.Match) -> str:
        key, punct = m.group(1), m.group(2) or ""
        value = values.get(key) if key in CATEGORIES else None
        if isinstance(value, (list, tuple)):
            value = ", ".join(v for v in value if v)
        value = (value or "").strip()
        if not value:
            return ""
        if punct == "." and value.endswith(_ENDS_SENTENCE):
            punct = ""
        if punct == "," and value.endswith(","):
            punct = ""
        return value + punct

    text = _PLACEHOLDER.sub(fill, fmt)
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"[ \t]+", " ", line).strip()
        line = re.sub(r"^(?:[,.]\s*)+", "", line)  # separators left by removed placeholders
        line = re.sub(r"(?:,\s*)+,", ",", line)
        if line and re.fullmatch(r"[\s,.;]*", line):
            line = ""
        lines.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip().strip(",").strip()
