"""Fuzzing what a user can drop or type: mutated weight files, diffusers folders (config.json, shard index) and
node widget values. Every case either loads / validates or raises TwigError naming the file or field — never
another exception, never a hang (hypothesis' per-case deadline) and never a pickle that runs code (a
malicious payload is among the mutated files; its marker file must never appear).

Runs are derandomized (the same cases every run) and sized to finish in well under a minute; ``CASES`` below
holds the count of each family, and README's Reliability section their sum. A new file format joins by adding
its valid-file builder to ``FORMATS`` (GGUF: a file the ``gguf`` package writes, with a quantized and a plain tensor).
"""

from __future__ import annotations

import json
import math
import struct
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tests.builders import TINY_TRANSFORMER, tiny_transformer
from twig_core import loader
from twig_core.errors import TwigError
from twig_core.weights import open_weights

CASES = {"safetensors bytes": 600, "safetensors header": 600, "pth zip": 300, "legacy pickle": 300,
         "diffusers folder": 300, "dc-ae config": 150, "gguf bytes": 400}


def fuzz(n: int):
    return settings(max_examples=n, deadline=timedelta(seconds=3), derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


class _Evil:
    """Unpickling this calls Path.touch(marker): a pickle that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5),
            "c": torch.zeros(0, 2, dtype=torch.float16)}


def _safetensors(tmp):
    save_file(_tensors(), str(tmp / "base.safetensors"))
    return (tmp / "base.safetensors").read_bytes()


def _torch_file(tmp, zip_format: bool, evil: bool = False):
    payload = {"state_dict": _tensors()}
    if evil:
        payload["extra"] = _Evil(str(tmp / "pwned"))
    torch.save(payload, tmp / "base.pth", _use_new_zipfile_serialization=zip_format)
    return (tmp / "base.pth").read_bytes()


def _gguf(tmp):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp / "base.gguf"), "sana")
    g = np.random.default_rng(0)
    q8 = gguf.quants.quantize(g.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blocks.0.attn.proj.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blocks.0.attn.proj.bias", g.standard_normal(4).astype(np.float32))
    writer.add_array("comfy.gguf.orig_shape.x", [4, 64])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return (tmp / "base.gguf").read_bytes()


# A new reader joins here: format name -> builder of a valid file's bytes in a scratch folder.
FORMATS = {
    "safetensors": _safetensors,
    "pth zip": lambda tmp: _torch_file(tmp, True),
    "pth zip, malicious": lambda tmp: _torch_file(tmp, True, evil=True),
    "legacy pickle": lambda tmp: _torch_file(tmp, False),
    "legacy pickle, malicious": lambda tmp: _torch_file(tmp, False, evil=True),
    "gguf": _gguf,
}


def read_everything(path) -> None:
    """What a loader does with a weight file: open it, then every tensor's meta and data."""
    w = open_weights(path)
    for key in w:
        w.meta(key)
        w[key]


def expect_ok_or_named(fn, *args, name: str):
    """``fn(*args)`` returns, or raises TwigError whose message names ``name``; anything else fails the case."""
    try:
        fn(*args)
    except TwigError as e:
        assert name in str(e), f"TwigError without {name!r}: {e}"


@st.composite
def mutations(draw, size: int, hot: int):
    """A list of edits of a ``size``-byte file, most of them in its first ``hot`` bytes (the header)."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        end = draw(st.sampled_from([hot, hot, size]))
        pos = draw(st.integers(0, max(end - 1, 0)))
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "u64"]))
        edits.append((kind, pos, draw(st.integers(0, 255)), draw(st.integers(0, 2**64 - 1))))
    return edits


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, byte, big in edits:
        pos = min(pos, max(len(b) - 1, 0))
        if kind == "flip" and b:
            b[pos] ^= 1 << (byte % 8)
        elif kind == "set" and b:
            b[pos] = byte
        elif kind == "cut":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = bytes([byte]) * (1 + byte % 7)
        elif kind == "u64" and len(b) >= 8:
            b[:8] = struct.pack("<Q", big if byte % 2 else big % 4096)
    return bytes(b)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mutated_weight_files_load_or_are_refused_naming_the_file(scratch, fmt):
    tmp = scratch / fmt.replace(" ", "_").replace(",", "")
    tmp.mkdir()
    base = FORMATS[fmt](tmp)
    hot = 8 + struct.unpack("<Q", base[:8])[0] if fmt == "safetensors" else len(base)
    family = {"safetensors": "safetensors bytes", "gguf": "gguf bytes"}.get(fmt) or (
        "pth zip" if "zip" in fmt else "legacy pickle")
    n = CASES[family] if fmt in ("safetensors", "gguf") else CASES[family] // 2  # plain and malicious halves
    path = tmp / "fuzzed.safetensors"  # the name says safetensors whatever the bytes: readers sniff them

    @fuzz(n)
    @given(mutations(len(base), hot))
    def case(edits):
        path.write_bytes(mutate(base, edits))
        expect_ok_or_named(read_everything, path, name=path.name)
        assert not (tmp / "pwned").exists(), "a pickle ran code"

    case()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
DIM = st.integers(-3, 6) | st.integers(-2**70, 2**70)


@st.composite
def headers(draw):
    """A safetensors header: plausible entries with odd dtypes, shapes and offsets, or any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    header = {}
    for i in range(draw(st.integers(0, 4))):
        entry = {"dtype": draw(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "Q4", ""])),
                 "shape": draw(st.lists(DIM, max_size=4)),
                 "data_offsets": draw(st.lists(st.integers(-8, 256) | DIM, min_size=2, max_size=3))}
        if draw(st.booleans()):  # offsets a writer would give that shape (4 bytes an element, whatever the dtype)
            begin = draw(st.integers(0, 64))
            entry["data_offsets"] = [begin, begin + 4 * math.prod(entry["shape"])]
        if draw(st.integers(0, 5)) == 0:
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
        header[draw(st.text(max_size=6)) + str(i)] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(JSON)
    return header


def test_safetensors_headers_of_any_shape_load_or_are_refused_naming_the_file(scratch):
    path = scratch / "header.safetensors"

    @fuzz(CASES["safetensors header"])
    @given(headers(), st.integers(0, 300))
    def case(header, data_bytes):
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data_bytes))
        expect_ok_or_named(read_everything, path, name=path.name)

    case()


def test_deeply_nested_header_is_refused_naming_the_file(scratch):
    path = scratch / "deep.safetensors"
    text = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(TwigError, match="deep.safetensors"):
        read_everything(path)


# ---------------------------------------------------------------------------------------------------
# diffusers folders: config.json and the shard index


def _diffusers_folder(root):
    from twig_core import keymap

    model = tiny_transformer()
    sd = keymap.ours_to_diffusers(model.state_dict())
    names = sorted(sd)
    half = len(names) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[half:]}
    root.mkdir()
    for file, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(root / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    config = {"_class_name": "SanaTransformer2DModel", **TINY_TRANSFORMER.to_diffusers_config()}
    return model, config, index


def _edit(draw, obj: dict) -> dict:
    """``obj`` with a few keys set to odd JSON values or deleted (or, once in a while, no object at all)."""
    if draw(st.integers(0, 15)) == 0:
        return draw(JSON)
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(obj) + ["extra"]))
        if draw(st.booleans()) and key in obj:
            del obj[key]
        else:
            obj[key] = draw(JSON | DIM | st.sampled_from([0, -1, 1, 2, 3, 16, 64, 1e9, math.nan]))
    return obj


def test_mutated_diffusers_folders_load_or_are_refused_naming_the_folder(scratch):
    root = scratch / "dfolder"
    model, config, index = _diffusers_folder(root)
    want = model.state_dict()
    index_path = root / "diffusion_pytorch_model.safetensors.index.json"

    @fuzz(CASES["diffusers folder"])
    @given(st.data())
    def case(data):
        target = data.draw(st.sampled_from(["config", "index", "weight_map", "both"]))
        cfg, idx = config, index
        if target in ("config", "both"):
            cfg = _edit(data.draw, config)
        if target in ("index", "both"):
            idx = _edit(data.draw, index)
        if target == "weight_map":
            idx = {**index, "weight_map": _edit(data.draw, index["weight_map"])}
        (root / "config.json").write_text(json.dumps(cfg))
        index_path.write_text(json.dumps(idx))
        try:
            got = loader.load_transformer(root)
        except TwigError as e:
            assert "dfolder" in str(e), f"TwigError without the folder: {e}"
            return
        if cfg == config and idx == index:
            assert all(torch.equal(got.state_dict()[k], want[k]) for k in want)

    case()


# ---------------------------------------------------------------------------------------------------
# Node inputs: widget values through their INPUT_TYPES ranges and beyond, sockets from the tiny models

NODE_CASES = {"TwigEmptyLatent": 100, "TwigSampler": 30, "TwigVAEDecode": 30, "TwigVAEEncode": 30,
              "TwigTextEncode": 50, "TwigFlowSigmas": 100, "TwigFaceDetect": 40}
VALIDATE_CASES = 300  # the loaders' VALIDATE_INPUTS over names in their lists and made-up ones
CASES["node inputs"] = sum(NODE_CASES.values()) + VALIDATE_CASES


def widget(spec):
    """Values for one widget: inside its range (its cheap low end: a 200-step sample of a 4096-image batch is
    valid but slow), on and beyond its edges, and of the wrong kind."""
    kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, (list, tuple)):
        return st.sampled_from(list(kind)) | st.text(max_size=12) if kind else st.text(max_size=12)
    if kind == "INT":
        lo, hi = opts.get("min", -2**63), opts.get("max", 2**63 - 1)
        return st.integers(lo, min(hi, lo + 3 * opts.get("step", 1))) | st.sampled_from([lo - 1, hi + 1, -2**63, 2**64])
    if kind == "FLOAT":
        lo, hi = opts.get("min", -1e9), opts.get("max", 1e9)
        return st.floats(lo, hi) | st.sampled_from([lo - 0.5, hi + 1.0, math.nan, math.inf, -math.inf])
    if kind == "STRING":
        return st.text(max_size=200)
    if kind == "BOOLEAN":
        return st.booleans()
    return None  # a socket


@pytest.fixture(scope="module")
def sockets(parts, conds):
    model, te, vae = parts
    latent = {"samples": torch.zeros(1, 32, 2, 3)}
    return {"TWIG_MODEL": model, "TWIG_TEXT_ENCODER": te, "TWIG_VAE": vae, "TWIG_CONDITIONING": conds[0],
            "LATENT": latent, "IMAGE": torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("name", list(NODE_CASES))
def test_node_widgets_in_and_out_of_range_run_or_are_refused_with_a_twig_error(sockets, name, monkeypatch):
    import types

    import nodes
    from nodes import host

    # a refused call frees its tensors with gc.collect(), ~0.1 s with models loaded: skipped for hundreds of cases
    monkeypatch.setattr(host, "gc", types.SimpleNamespace(collect=lambda: 0))

    cls = nodes.NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    fields = {**spec.get("required", {}), **spec.get("optional", {})}
    strategies = {}
    for field, s in fields.items():
        w = widget(s)
        strategies[field] = w if w is not None else st.just(sockets[s[0]])

    @fuzz(NODE_CASES[name])
    @given(st.fixed_dictionaries(strategies))
    def case(kwargs):
        try:
            getattr(cls(), cls.FUNCTION)(**kwargs)
        except TwigError as e:
            assert "unexpected" not in str(e), f"{name}{kwargs}: {e}"

    case()


@pytest.mark.parametrize("name", ["TwigModelLoader", "TwigTextEncoderLoader", "TwigVAELoader"])
def test_loader_file_choices_validate_or_name_the_folder(models_dir, name):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[name]
    field, spec = next(iter(cls.INPUT_TYPES()["required"].items()))
    listed = list(spec[0])

    @fuzz(VALIDATE_CASES // 3)
    @given(st.sampled_from(listed) | st.text(max_size=40) | st.sampled_from(["../../etc/passwd", "", "/", "a/../b"]))
    def case(value):
        got = cls.VALIDATE_INPUTS(value)
        assert got is True or (isinstance(got, str) and value not in listed), (value, got)

    case()


def test_mutated_dcae_configs_load_or_are_refused_naming_the_folder(scratch):
    from tests.builders import TINY_DCAE, tiny_dcae

    root = scratch / "vfolder"
    root.mkdir()
    vae = tiny_dcae()
    save_file(vae.state_dict(), str(root / "diffusion_pytorch_model.safetensors"))
    config = json.loads(json.dumps({"_class_name": "AutoencoderDC", **TINY_DCAE.to_dict()}))
    want = vae.decoder.state_dict()

    @fuzz(CASES["dc-ae config"])
    @given(st.data())
    def case(data):
        cfg = _edit(data.draw, config)
        (root / "config.json").write_text(json.dumps(cfg))
        try:
            got = loader.load_vae(root)
        except TwigError as e:
            assert "vfolder" in str(e), f"TwigError without the folder: {e}"
            return
        if cfg == config:
            assert all(torch.equal(got.decoder.state_dict()[k], want[k]) for k in want)

    case()
