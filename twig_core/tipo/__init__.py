"""TIPO prompt expansion ("text presampling"): a short idea in, a long, detailed Twig prompt out.

TIPO (KohakuBlueleaf; LLaMA-architecture models of 100M, 200M and 500M parameters) continues a request
written in its own ``key: value`` format and turns a few tags and/or a sentence into a long tag list and
description. This package is our own implementation of that format and of the generation loop around a
transformers ``LlamaForCausalLM``:

- ``tags``: categories, tag lists, ``(word:1.2)`` weights, ban lists, CJK detection;
- ``request``: planning passes, writing requests, parsing answers, cleaning them, formatting prompts;
- ``model``: loading a local model (folder or single file) and seeded generation;
- ``expand``: the whole run.

Format placeholders: ``<|special|>`` (1girl, 2boys...), ``<|characters|>``, ``<|copyrights|>``,
``<|artist|>``, ``<|general|>`` (all other tags), ``<|generated|>`` (a description written from the tags),
``<|extended|>`` (the user's sentence, extended), ``<|quality|>``, ``<|meta|>``, ``<|rating|>``.

    from twig_core.tipo import TipoModel, expand, Sampling
    tipo = TipoModel.from_pretrained("models/LLM/TIPO-500M-ft", dtype="fp16", device="cuda")
    result = expand(tipo, tags="1girl, red hair", nl_prompt="a girl in a garden", seed=7)
    result.prompt, result.user_prompt, result.parts
"""

from .expand import AUTO, Pass, TipoResult, expand, run_steps
from .model import Generation, Sampling, TipoModel, find_files
from .request import (DEFAULT_FORMAT, FORMAT_PRESETS, LENGTHS, NL_MAX, NL_MIN, TAG_MAX, TAG_MIN, TASKS, Plan, Step,
                      format_prompt, long_enough, meta_lines, parse_output, plan, postprocess, request_text,
                      resolve_format, sections, single_task_plan)
from .tags import (CATEGORIES, BanList, TagLists, Weighted, has_cjk, load_tag_lists, parse_weights,
                   split_tag_text, tag_list_folders)

__all__ = [
    "AUTO", "Pass", "TipoResult", "expand", "run_steps", "Generation", "Sampling", "TipoModel",
    "find_files", "DEFAULT_FORMAT", "FORMAT_PRESETS", "LENGTHS", "NL_MAX", "NL_MIN", "TAG_MAX", "TAG_MIN",
    "TASKS", "Plan", "Step", "format_prompt", "long_enough", "meta_lines", "parse_output", "plan", "postprocess",
    "request_text", "resolve_format", "sections", "single_task_plan", "CATEGORIES", "BanList", "TagLists",
    "Weighted", "has_cjk", "load_tag_lists", "parse_weights", "split_tag_text", "tag_list_folders",
]
