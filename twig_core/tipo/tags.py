"""Tags: the categories TIPO knows, sorting a tag list into them, ``(word:1.2)`` weights, ban lists, CJK text.

TIPO writes a prompt as Danbooru-style categories. The small, fixed ones are built in here (head counts,
quality, rating). Artist, character, copyright and meta tags are recognised through plain-text tag lists,
one tag per line, named ``artist.txt``, ``characters.txt``, ``copyrights.txt`` and ``meta.txt`` in a
``tag-list`` folder (the lists that ship with TIPO's own tools have this layout). Without the lists those
tags count as general tags; a tag may also carry its category explicitly as ``artist:name``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

# The categories of a TIPO prompt, in the order they are written by the format presets.
CATEGORIES = ("special", "characters", "copyrights", "artist", "general", "generated", "extended",
              "quality", "meta", "rating")
TAG_CATEGORIES = ("special", "characters", "copyrights", "artist", "general", "quality", "meta", "rating")

# Head-count tags: written first, before the characters.
SPECIAL_TAGS = (
    "1girl", "2girls", "3girls", "4girls", "5girls", "6+girls", "multiple girls",
    "1boy", "2boys", "3boys", "4boys", "5boys", "6+boys", "multiple boys", "male focus",
    "1other", "2others", "3others", "4others", "5others", "6+others", "multiple others",
)
# Quality, aesthetic and year tags of the Danbooru-trained families, plus the Pony score/source tags.
QUALITY_TAGS = (
    "masterpiece", "best quality", "great quality", "good quality", "normal quality", "low quality",
    "worse quality", "very aesthetic", "aesthetic", "displeasing", "very displeasing",
    "newest", "recent", "mid", "early", "old",
    "score_9", "score_8_up", "score_7_up", "score_6_up", "score_5_up", "score_4_up",
    "source_anime", "source_cartoon", "source_furry", "source_pony",
)
RATING_TAGS = ("safe", "general", "sfw", "sensitive", "nsfw", "explicit")
# A few image-meta tags, so the commonest ones are sorted right even without meta.txt.
META_TAGS = ("highres", "absurdres", "incredibly absurdres", "lowres", "official art", "commentary request",
             "translated", "ai-generated", "traditional media")

# Lists read from a tag-list folder, and the order in which a tag is looked up (the lists do not overlap).
LIST_FILES = ("meta", "artist", "characters", "copyrights")
LOOKUP_ORDER = ("meta", "artist", "characters", "copyrights", "special", "quality", "rating")

# Explicit category prefixes a user may write (``artist:name``); both spellings of the plural ones.
PREFIXES = {
    "artist": "artist", "character": "characters", "characters": "characters", "copyright": "copyrights",
    "copyrights": "copyrights", "meta": "meta", "rating": "rating", "quality": "quality",
    "general": "general", "special": "special",
}


@dataclass(frozen=True)
class TagLists:
    """Tag sets per category; ``sources`` names the files they were read from."""

    sets: Mapping[str, frozenset]
    sources: tuple[str, ...] = ()

    @classmethod
    def builtin(cls) -> "TagLists":
        sets = {name: frozenset() for name in LOOKUP_ORDER}
        sets.update(special=frozenset(SPECIAL_TAGS), quality=frozenset(QUALITY_TAGS),
                    rating=frozenset(RATING_TAGS), meta=frozenset(META_TAGS))
        return cls(sets)

    @property
    def complete(self) -> bool:
        """True when artist, character and copyright lists were found (not only the built-in sets)."""
        return all(self.sets.get(n) for n in ("artist", "characters", "copyrights"))

    def category(self, tag: str) -> tuple[str, str]:
        """(category, tag as written in the prompt) for one stripped, non-empty tag.

        A tag is looked up as written, then with underscores as spaces; a tag found in no list is general,
        written with spaces for underscores unless it is shorter than 4 characters (so ``^_^`` stays).
        """
        for name in LOOKUP_ORDER:
            found = self.sets.get(name, ())
            if tag in found:
                return name, tag
            spaced = tag.replace("_", " ")
            if spaced in found:
                return name, spaced
        return "general", (tag if len(tag) < 4 else tag.replace("_", " "))

    def split(self, tags: Iterable[str], prefixes: bool = False) -> dict[str, list[str]]:
        """Sort tags into ``{category: [tags]}`` (every tag category present, possibly empty), order kept.

        With ``prefixes``, ``artist:name`` style tags go to the named category with the prefix removed.
        """
        out: dict[str, list[str]] = {name: [] for name in LOOKUP_ORDER}
        out["general"] = []
        for raw in tags:
            tag = raw.strip()
            if not tag:
                continue
            if prefixes and ":" in tag:
                head, rest = tag.split(":", 1)
                cat = PREFIXES.get(head.strip().lower())
                if cat is not None and rest.strip():
                    out[cat].append(rest.strip())
                    continue
            cat, written = self.category(tag)
            out[cat].append(written)
        return out


def _read_list(path: str) -> frozenset:
    with open(path, encoding="utf-8", errors="replace") as f:
        return frozenset(line.strip() for line in f if line.strip())


def kgen_tag_list_folder() -> str | None:
    """The ``tag-list`` folder of an installed TIPO-KGen package (found without importing it), if any."""
    try:
        spec = importlib.util.find_spec("kgen")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        folder = os.path.join(loc, "tag-list")
        if os.path.isdir(folder):
            return folder
    return None


def tag_list_folders(search: Sequence[str | os.PathLike], use_kgen: bool = True) -> list[str]:
    """Existing ``tag-list`` folders: each path in ``search`` that holds list files itself or in ``tag-list/``,
    then the one of an installed TIPO-KGen package."""
    found: list[str] = []
    for p in search:
        p = os.fspath(p)
        for cand in (p, os.path.join(p, "tag-list")):
            if os.path.isdir(cand) and any(os.path.isfile(os.path.join(cand, f"{n}.txt")) for n in LIST_FILES):
                if os.path.abspath(cand) not in found:
                    found.append(os.path.abspath(cand))
                break
    if use_kgen:
        k = kgen_tag_list_folder()
        if k and os.path.abspath(k) not in found:
            found.append(os.path.abspath(k))
    return found


_LIST_CACHE: dict[tuple, TagLists] = {}
_LIST_LOCK = threading.Lock()


def load_tag_lists(folders: Sequence[str | os.PathLike] = ()) -> TagLists:
    """Built-in sets plus every list file in ``folders`` (first folder having a file wins for that list).

    Results are cached per (folders, file times); the full lists are large (about a million tags).
    """
    files: dict[str, str] = {}
    for folder in folders:
        for name in LIST_FILES:
            path = os.path.join(os.fspath(folder), f"{name}.txt")
            if name not in files and os.path.isfile(path):
                files[name] = path
    key = tuple(sorted((n, p, os.stat(p).st_mtime_ns) for n, p in files.items()))
    with _LIST_LOCK:
        if key in _LIST_CACHE:
            return _LIST_CACHE[key]
        base = TagLists.builtin()
        sets = dict(base.sets)
        for name, path in files.items():
            sets[name] = _read_list(path) | (sets[name] if name == "meta" else frozenset())
        lists = TagLists(sets, tuple(files[n] for n in LIST_FILES if n in files))
        _LIST_CACHE.clear()  # keep one set of big lists in memory
        _LIST_CACHE[key] = lists
        return lists


# --------------------------------------------------------------------------------------------------
# Splitting user input


def split_tag_text(text: str) -> list[str]:
    """Tags from a comma (or newline) separated string, stripped, empties dropped."""
    return [t.strip() for t in re.split(r"[,\n]", text or "") if t.strip()]


def one_line(text: str) -> str:
    """Text on one line (TIPO's sections are lines): newlines and runs of spaces become single spaces."""
    return re.sub(r"\s+", " ", text or "").strip()


_CJK = re.compile(
    "[\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
    "\U00020000-\U0002ffff]"
)


def has_cjk(text: str) -> bool:
    """True if ``text`` has Chinese, Japanese or Korean characters (TIPO only reads English)."""
    return bool(_CJK.search(text or ""))


# --------------------------------------------------------------------------------------------------
# Ban lists


@dataclass(frozen=True)
class BanList:
    """Tags to drop. An entry bans every tag that contains it, or that it matches as a regular expression
    from the tag's start (``re.match``); an entry that is not a valid expression is used as plain text."""

    entries: tuple[str, ...] = ()
    patterns: tuple = field(default=(), compare=False)

    @classmethod
    def parse(cls, text: str | Iterable[str]) -> "BanList":
        items = split_tag_text(text) if isinstance(text, str) else [t.strip() for t in text if t.strip()]
        pats = []
        for item in items:
            try:
                pats.append(re.compile(item))
            except re.error:
                pats.append(None)
        return cls(tuple(items), tuple(pats))

    def banned(self, tag: str) -> bool:
        for item, pat in zip(self.entries, self.patterns):
            if item in tag or (pat is not None and pat.match(tag) is not None):
                return True
        return False

    def filter(self, tags: Iterable[str]) -> list[str]:
        return [t for t in tags if not self.banned(t)]

    def __bool__(self) -> bool:
        return bool(self.entries)


# --------------------------------------------------------------------------------------------------
# Weights: "(word:1.2)", "(word)" = 1.1, "[word]" = 1/1.1, "\(" a literal bracket


_WEIGHT_TOKEN = re.compile(r"\\.|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split A1111-style emphasis into (text, weight) runs; neighbouring runs of equal weight are merged.

    ``(a:1.3)`` multiplies a's weight by 1.3, ``(a)`` by 1.1, ``[a]`` by 1/1.1; brackets nest; an unclosed
    bracket applies to the end; ``\\(`` and friends are literal characters.
    """
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _WEIGHT_TOKEN.finditer(text or ""):
        tok, number = m.group(0), m.group(1)
        if tok.startswith("\\"):
            runs.append([tok[1:], 1.0])
        elif tok == "(":
            open_round.append(len(runs))
        elif tok == "[":
            open_square.append(len(runs))
        elif number is not None and open_round:
            scale(open_round.pop(), float(number))
        elif tok == ")" and open_round:
            scale(open_round.pop(), 1.1)
        elif tok == "]" and open_square:
            scale(open_square.pop(), 1 / 1.1)
        else:
            runs.append([tok, 1.0])
    for start in open_round:
        scale(start, 1.1)
    for start in open_square:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(list(run))
    return [(t, w) for t, w in merged if t]


def format_weight(w: float) -> str:
    return f"{w:.4g}"


def escape_brackets(text: str) -> str:
    """Write literal brackets so a weight-aware text encoder does not read them as emphasis."""
    return re.sub(r"([()\[\]])", r"\\\1", text)


@dataclass
class Weighted:
    """User input with its emphasis taken out: plain tags / text for TIPO, and what to put back afterwards."""

    tags: list[str]
    tag_weights: dict[str, float]
    text: str
    text_weights: list[tuple[str, float]]

    @property
    def any(self) -> bool:
        return bool(self.tag_weights or self.text_weights)

    @classmethod
    def from_input(cls, tags: str, text: str) -> "Weighted":
        plain_tags: list[str] = []
        tag_weights: dict[str, float] = {}
        for run, w in parse_weights(tags):
            for tag in split_tag_text(run):
                plain_tags.append(tag)
                if w != 1.0:
                    tag_weights[tag] = w
                    tag_weights.setdefault(tag.replace("_", " "), w)
        plain_text = ""
        text_weights: list[tuple[str, float]] = []
        for run, w in parse_weights(text):
            plain_text += run
            if w != 1.0 and run.strip():
                text_weights.append((run.strip(), w))
        return cls(plain_tags, tag_weights, plain_text, text_weights)

    def apply_tags(self, tags: Sequence[str], escape: bool) -> list[str]:
        out = []
        for tag in tags:
            shown = escape_brackets(tag) if escape else tag
            w = self.tag_weights.get(tag)
            out.append(f"({shown}:{format_weight(w)})" if w is not None else shown)
        return out

    def apply_text(self, text: str, escape: bool) -> str:
        """Put the user's weighted phrases back around their first occurrences, in order."""
        out, pos = "", 0
        for part, w in self.text_weights:
            i = text.find(part, pos)
            if i < 0:
                continue
            before = text[pos:i]
            out += (escape_brackets(before) if escape else before)
            out += f"({escape_brackets(part) if escape else part}:{format_weight(w)})"
            pos = i + len(part)
        rest = text[pos:]
        return out + (escape_brackets(rest) if escape else rest)
