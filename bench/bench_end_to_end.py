"""End to end, the number a user feels: one prompt -> PNG, twig_core's CLI vs diffusers' SanaPipeline.

Every contender runs in its own process (peak RSS its own), from interpreter start to the PNG on disk, on random
weights of the real full-size architectures (Gemma-2-2B text encoder, 1600M transformer, DC-AE f32c32):

- ``diffusers-fp32`` / ``diffusers-bf16``: ``SanaPipeline.from_pretrained(folder, torch_dtype=...)`` on a
  diffusers pipeline folder (transformer stored bf16 as in the published BF16 repository, DC-AE fp32, the
  Gemma folder below as ``text_encoder/`` + ``tokenizer/``), DPM-Solver++ with flow sigmas (shift 3), no
  resolution binning (the size asked is the size drawn), ``pipe.vae.enable_tiling()`` above 1024².
- ``twig`` (or ``twig-NAME`` per ``--twig-preset NAME``): ``python -m twig_core generate`` (its ``main``, called
  in the contender's process with the same arguments) on the published layout (fp16 NVlabs ``.pth``, Gemma-2
  folder, DC-AE safetensors; bench/common.py writes them), with ``--preset NAME`` and ``--twig-args`` passed on.
  That is the command line's default one-shot mode: each network loaded when its stage comes and dropped after
  (Gemma-2, the transformer, the DC-AE), so its peak RSS is the largest network's; ``--twig-args=--keep-loaded``
  measures the mode with all three loaded first.

Both draw 20 steps at CFG 4.5 by default. Per contender it prints text-encode, sampling and decode seconds (the
span of the pipeline's own calls: diffusers' ``encode_prompt`` / transformer ``forward`` / ``vae.decode``,
twig_core's ``TextEncoder.encode`` / ``pipeline.sample_latents`` / ``dcae_exec.decode``, each wrapped with a
timer in that process), the rest (imports, loading, PNG), total wall, peak RSS (VmHWM; peak VRAM on CUDA) and
ratios to diffusers' best (the faster of fp32 and bf16 in the same run). ``--layers`` / ``--gemma-layers``
build fewer blocks for quick checks; the output then also gives the totals with sampling (and text encoding)
scaled linearly to full depth, and says so.

Full size (about 14 GB of weights; ``--dir`` keeps them for the next run; diffusers fp32 peaks near 19 GB)::

    python bench/bench_end_to_end.py --dir ~/.cache/twig_e2e --keep
    python bench/bench_end_to_end.py --dir ~/.cache/twig_e2e --keep --size 2048 --skip diffusers-fp32
    python bench/bench_end_to_end.py --dir ~/.cache/twig_e2e --keep --twig-preset quality balanced fast

Quick check that the script runs (not a benchmark)::

    python bench/bench_end_to_end.py --layers 1 --gemma-layers 1 --steps 2 --size 256
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import GEMMA_2_2B, peak_rss_mib  # noqa: E402

PROMPT = "a red fox standing in fresh snow at dawn, soft light, detailed fur; 一只站在雪地里的红狐狸"
DIFFUSERS = {"diffusers-fp32": "float32", "diffusers-bf16": "bfloat16"}
FULL_DEPTH = 20


def write_diffusers(folder: str, gemma: str, layers: int) -> str:
    """A SanaPipeline folder in ``folder`` (kept if there): random transformer and DC-AE, ``gemma`` linked as
    its text encoder and tokenizer."""
    import torch
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from safetensors.torch import save_file

    from twig_core.dcae import DCAE_F32C32_SANA

    root = os.path.join(folder, f"sana_diffusers_{layers}l_{os.path.basename(gemma)}")
    if os.path.isfile(os.path.join(root, "model_index.json")):
        return root
    os.makedirs(root, exist_ok=True)
    for name in ("text_encoder", "tokenizer"):
        if not os.path.lexists(os.path.join(root, name)):
            os.symlink(os.path.abspath(gemma), os.path.join(root, name))
    g = torch.Generator().manual_seed(1)
    with torch.device("meta"):
        model = SanaTransformer2DModel(num_layers=layers)  # its defaults are the 1600M 1024px model
    model.save_config(os.path.join(root, "transformer"))
    save_file({k: (torch.randn(v.shape, generator=g) * 0.02).bfloat16() for k, v in model.state_dict().items()},
              os.path.join(root, "transformer", "diffusion_pytorch_model.safetensors"))
    torch.manual_seed(1)
    AutoencoderDC(**DCAE_F32C32_SANA.to_dict()).save_pretrained(os.path.join(root, "vae"))
    DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                algorithm_type="dpmsolver++", solver_order=2).save_config(os.path.join(root, "scheduler"))
    import diffusers

    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "SanaPipeline", "_diffusers_version": diffusers.__version__,
                   "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                   "text_encoder": ["transformers", "Gemma2Model"],
                   "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                   "transformer": ["diffusers", "SanaTransformer2DModel"],
                   "vae": ["diffusers", "AutoencoderDC"]}, f, indent=1)
    return root


class Spans:
    """Wall-clock span of each stage: from the first call's start to the last call's end of the wrapped callables."""

    def __init__(self, device: str):
        self.spans: dict[str, list[float]] = {}
        self.device = device

    def wrap(self, owner, attr: str, stage: str) -> None:
        import torch

        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.device.startswith("cuda"):
                    torch.cuda.synchronize()
                span = self.spans.setdefault(stage, [t0, t0])
                span[1] = time.perf_counter()

        setattr(owner, attr, timed)

    def seconds(self) -> dict[str, float]:
        return {stage: end - start for stage, (start, end) in self.spans.items()}


def child_diffusers(folder: str, dtype: str, a: argparse.Namespace) -> dict:
    import torch
    from diffusers import SanaPipeline

    spans = Spans(a.device)
    pipe = SanaPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype)).to(a.device)
    if a.size > 1024:
        pipe.vae.enable_tiling()  # what a diffusers user turns on for large images
    spans.wrap(pipe, "encode_prompt", "text")
    spans.wrap(pipe.transformer, "forward", "sampling")
    spans.wrap(pipe.vae, "decode", "decode")
    image = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=a.steps, guidance_scale=a.cfg,
                 height=a.size, width=a.size, generator=torch.Generator().manual_seed(0),
                 use_resolution_binning=False, max_sequence_length=300).images[0]
    image.save(a.out)
    return {"stages": spans.seconds()}


def child_twig(argv: list[str], a: argparse.Namespace) -> dict:
    from twig_core import dcae_exec, pipeline
    from twig_core.__main__ import main
    from twig_core.text import TextEncoder

    spans = Spans(a.device)
    spans.wrap(TextEncoder, "encode", "text")
    spans.wrap(pipeline, "sample_latents", "sampling")
    spans.wrap(dcae_exec, "decode", "decode")
    rc = main(argv)
    if rc:
        raise SystemExit(rc)
    return {"stages": spans.seconds()}


def run_child(name: str, spec: dict, a: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps({"name": name, **spec}), "--size",
           str(a.size), "--steps", str(a.steps), "--cfg", str(a.cfg), "--device", a.device, "--out", out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode or not os.path.isfile(out):
        return {"error": (proc.stderr or proc.stdout)[-3000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["total"] = wall
    return res


def child(spec: dict, a: argparse.Namespace) -> None:
    import torch

    if spec["name"] in DIFFUSERS:
        res = child_diffusers(spec["folder"], DIFFUSERS[spec["name"]], a)
    else:
        argv = ["generate", "--prompt", PROMPT, "--transformer", spec["transformer"], "--text-encoder",
                spec["text"], "--vae", spec["vae"], "--width", str(a.size), "--height", str(a.size), "--steps",
                str(a.steps), "--cfg", str(a.cfg), "--seed", "0", "--device", a.device, "--out", a.out]
        res = child_twig(argv + spec["extra"], a)
    res["peak_rss_gib"] = peak_rss_mib() / 1024
    if a.device.startswith("cuda"):
        res["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res))


def machine() -> str:
    """CPU model, the flags that decide the fast dtypes, and the library versions."""
    import platform

    import diffusers
    import torch
    import transformers

    from twig_core.devices import cpu_flags

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in cpu_flags()]
    return (f"{cpu}, {os.cpu_count()} cores, flags: {' '.join(wanted) or 'n/a'} (torch uses "
            f"{torch.backends.cpu.get_cpu_capability()}); torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, transformers {transformers.__version__}")


def _fmt(x: float | None, spec: str = "7.1f", unit: str = "") -> str:
    return format(x, spec) + unit if x is not None else "n/a".rjust(int(spec.split(".")[0]) + len(unit))


def report(results: dict[str, dict], a: argparse.Namespace) -> None:
    import torch

    reduced = a.layers != FULL_DEPTH or a.gemma_layers != GEMMA_2_2B["num_hidden_layers"]
    print(f"end to end, prompt -> PNG, {a.size}x{a.size}, {a.steps} steps, CFG {a.cfg}, {a.device}, "
          f"{time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} torch threads")
    print(machine())
    if a.twig_args:
        print(f"twig contenders run with: {a.twig_args}")
    if reduced:
        print(f"REDUCED CHECK: {a.layers} of {FULL_DEPTH} transformer layers, {a.gemma_layers} of "
              f"{GEMMA_2_2B['num_hidden_layers']} Gemma-2 layers (not the full model; 'scaled' totals multiply "
              "sampling and text encoding up to full depth, a linear estimate)")
    ok = {k: r for k, r in results.items() if "error" not in r}
    scale = {"sampling": FULL_DEPTH / a.layers, "text": GEMMA_2_2B["num_hidden_layers"] / a.gemma_layers}
    for r in ok.values():
        st = r["stages"]
        r["other"] = r["total"] - sum(st.values())
        r["scaled"] = r["total"] + sum(st.get(k, 0.0) * (f - 1) for k, f in scale.items())
    key = "scaled" if reduced else "total"
    peers = [k for k in DIFFUSERS if k in ok]
    best = min(peers, key=lambda k: ok[k][key]) if peers else None
    if best:
        print(f"diffusers' best here: {best} (the anchor of the ratios)")
    head = (f"{'contender':<22} {'text s':>7} {'sampl. s':>8} {'decode s':>8} {'other s':>7} {'total s':>8} "
            + (f"{'scaled s':>8} " if reduced else "") + f"{'peak RSS GiB':>12} "
            + (f"{'VRAM GiB':>8} " if a.device.startswith("cuda") else "")
            + f"{'total/best':>10} {'text/best':>9} {'sampl./best':>11} {'decode/best':>11}")
    print(head)
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<22} FAILED: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        st = r["stages"]

        def ratio(stage):
            if not best or stage not in ok[best]["stages"] or stage not in st:
                return None
            return st[stage] / ok[best]["stages"][stage]

        line = (f"{name:<22} {_fmt(st.get('text'))} {_fmt(st.get('sampling'), '8.1f')} "
                f"{_fmt(st.get('decode'), '8.1f')} {_fmt(r['other'])} {_fmt(r['total'], '8.1f')} "
                + (f"{_fmt(r['scaled'], '8.1f')} " if reduced else "") + f"{_fmt(r['peak_rss_gib'], '12.2f')} "
                + (f"{_fmt(r.get('peak_vram_gib'), '8.2f')} " if a.device.startswith("cuda") else "")
                + f"{_fmt(r[key] / ok[best][key] if best else None, '9.2f', 'x')} "
                + f"{_fmt(ratio('text'), '8.2f', 'x')} {_fmt(ratio('sampling'), '10.2f', 'x')} {_fmt(ratio('decode'), '10.2f', 'x')}")
        print(line)
    if reduced and best:
        print("total/best uses the scaled totals")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (2048: diffusers tiles its decode)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--layers", type=int, default=FULL_DEPTH, help="transformer layers (fewer: a quick check)")
    ap.add_argument("--gemma-layers", type=int, default=GEMMA_2_2B["num_hidden_layers"],
                    help="Gemma-2 layers (fewer: a quick check)")
    ap.add_argument("--twig-preset", nargs="+", default=[], metavar="NAME",
                    help="one twig contender per name, run with the CLI's --preset NAME (default: the plain CLI)")
    ap.add_argument("--twig-args", default="", help='extra CLI flags for every twig contender, e.g. "--dtype bf16"')
    ap.add_argument("--skip", action="append", default=[], metavar="NAME",
                    help="leave out contenders (diffusers-fp32, diffusers-bf16, twig, twig-NAME; comma-separated "
                         "or repeated)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dir", default=None, help="where the weights go (default: a temp dir, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the weights (and the PNGs) in --dir")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.child:
        return child(json.loads(a.child), a)
    skip = {s for item in a.skip for s in item.split(",") if s}
    extra = shlex.split(a.twig_args)
    contenders = {name: {} for name in DIFFUSERS}
    for preset in a.twig_preset or [None]:
        contenders["twig" if preset is None else f"twig-{preset}"] = {
            "extra": (["--preset", preset] if preset else []) + extra}
    contenders = {k: v for k, v in contenders.items() if k not in skip}
    folder = a.dir or tempfile.mkdtemp(prefix="twig_bench_e2e_")
    os.makedirs(folder, exist_ok=True)
    try:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", "import json, sys; from bench.common import write_full_size; "
                              f"print(json.dumps(write_full_size({folder!r}, {a.layers}, {a.gemma_layers})))"],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        paths = json.loads(out.stdout.strip().splitlines()[-1])
        if any(k in DIFFUSERS for k in contenders):
            code = ("import json; from bench.bench_end_to_end import write_diffusers; "
                    f"print(json.dumps(write_diffusers({folder!r}, {paths['text']!r}, {a.layers})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
            diffusers_folder = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"weights ready in {time.perf_counter() - t0:.0f} s in {folder}", flush=True)
        results = {}
        for name, spec in contenders.items():
            spec = {"folder": diffusers_folder} if name in DIFFUSERS else {**paths, **spec}
            png = os.path.join(folder, f"e2e_{name}_{a.size}.png")
            if os.path.exists(png):
                os.remove(png)
            results[name] = run_child(name, spec, a, png)
            r = results[name]
            print(f"  {name}: " + (f"{r['total']:.1f} s" if "error" not in r else "failed"), flush=True)
        report(results, a)
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
