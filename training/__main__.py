"""Reproduce the embedded demo model: ``python -m training demo --work DIR [--stage STAGE]``; the 256² one in one
command: ``python -m training demo256 --work DIR`` (``training.recipe256``, these stages in the order that made it).

Stages run in order and each resumes from what the previous run left in DIR:
  seed     (only when named) fill an empty DIR from an exported pipeline folder (--from, default the shipped model)
           instead of the vae, decoder and text stages: tokenizer/, vae.ckpt + vae_scale.json (the exported DC-AE
           holds the tuned decoder), text.ckpt, and its DiT as DIR/dit_ema.pt (the 128² result); those three stages
           then skip, and export at 128² writes the same pipeline again
  data     render the scenes (256², area-averaged to 128²) and train the tokenizer
  vae      train the DC-AE                          (checkpoint DIR/vae.ckpt)
  latents  encode the training pictures              (DIR/latents.pt)
  decoder  train the DC-AE's decoder further, encoder frozen, objects weighted (checkpoint DIR/decoder.ckpt)
  text     pre-train Gemma-2 to read scenes out of captions (checkpoint DIR/text.ckpt)
  dit      train the DiT with flow matching, Gemma-2 frozen (checkpoint DIR/dit.ckpt)
  export   write the pipeline folder (default: twig_core/demo_model)
  eval     score held-out prompts with the pixel evaluator, English and Chinese, after the references: the shape
           classifier on the ground-truth pictures and the scores of those pictures through the DC-AE
           at 128² and at the data stage's 256² (pictures in DIR/eval/, scores in DIR/eval.json)
  prompts  write the held-out prompts as DIR/heldout_prompts.jsonl, for python -m twig_core batch --eval
  lora     train the demo LoRA (a new colour word, pink / 粉色) on the exported model (DIR/lora/, written to
           twig_core/demo_loras), then measure how often pink appears without and with it
``--stage all`` runs everything but seed that is not finished yet; several stages may be named, run in the order
given. Fixed seeds throughout. ``--size 256`` runs the latents, decoder, dit, export and eval stages on 256²
pictures (8x8 latents, the DC-AE keeps their shapes; files in DIR/size256; the decoder goes on from the 128² one).
Its DiT starts from the 128² weights (DIR/dit_ema.pt, or ``--dit-init``): every weight carries over, and the sin-cos
positions of the 8x8 grid are those of the 4x4 one interpolated (interpolation scale size/128), so a fine-tune
suffices; ``--mix-128`` alternates 256² and 128² batches so the one DiT keeps drawing 128² pictures. The 256² model
from the shipped one, its first DiT cycle and its decoder, about 3 h on an idle 2-core Xeon with AVX512
(OMP_NUM_THREADS=2), resumable (rerun the same command: each stage goes on from its files, the DiT from its
checkpoint of at most 5 minutes before, ``--save-minutes``):
  python -m training demo --work DIR --size 256 --stage seed data latents decoder dit export eval
      --out DIR/pipeline256 --fp32 --decoder-steps 700 --dit-steps 6000 --dit-restart none --dit-warmup 100 --lr 2e-4
twig_core/demo_model_256 is the 256² model as far as its training has come (an export, shipped as the 256² demo
model); in a fresh work folder ``--dit-init twig_core/demo_model_256 --decoder-init twig_core/demo_model_256`` goes
on from it: the DiT with a new cycle
(fresh optimizer state); export and eval with its DC-AE's 256² decoder (the decoder stage, if named, goes on
from that decoder):
  python -m training demo --work DIR --size 256 --stage seed data latents dit export eval --out DIR/pipeline256
      --fp32 --dit-init twig_core/demo_model_256 --decoder-init twig_core/demo_model_256 --dit-steps 5500
      --dit-restart none --dit-warmup 100 --lr 1.5e-4 --dit-focus star=3 cross=2 ring=2 center=2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from twig_core.catalog import DEMO_DIR, DEMO_LORA_DIR
from twig_core.sampling import parse_cfg_interval

from .demo import IMAGE_SIZE
from .trainer import (Checkpoint, downsample_u8, encode_all, finetune_decoder, focus_weights, latent_scale, log,
                      train_dit, train_vae)

# the files the seed stage writes, in place of the vae, decoder and text stages' training
SEEDED = ("tokenizer", "vae.ckpt", "vae_scale.json", "text.ckpt", "dit_ema.pt")
# peak learning rate of each --dit-restart cycle when --restart-lr is not given
RESTART_LR = (2e-4, 1.5e-4, 1.5e-4)


def _images(work: Path, split: str, size: int = 128) -> np.ndarray:
    cache = work / f"{split}{size}.npy"
    if not cache.exists():
        from .scenes import load_split

        images, _ = load_split(work / "data", split)
        np.save(cache, downsample_u8(images, size))
    return np.load(cache)


def _dit_work(work: Path, a) -> Path:
    """Where the stages on latents (latents, dit, export's input, eval's output) keep their files: DIR at 128²,
    DIR/size256 for ``--size 256`` (the data, DC-AE and text stages are shared: the DC-AE is convolutional)."""
    return work if a.size == 128 else work / f"size{a.size}"


def _records(work: Path, split: str) -> list[dict]:
    return json.loads((work / "data" / f"{split}.json").read_text(encoding="utf-8"))


def _tokenizer(work: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(work / "tokenizer", local_files_only=True)


def _vae_model(scaling_factor: float | None = None):
    """The recipe's DC-AE (random weights) with ``scaling_factor`` (default: the config's)."""
    from twig_core.dcae import DCAE

    from .demo import DEMO_DCAE

    return DCAE(DEMO_DCAE.replace(scaling_factor=scaling_factor or DEMO_DCAE.scaling_factor))


def _vae(work: Path, a=None):
    """The recipe's DC-AE: DIR/vae.ckpt, with the decoder stage's decoder (DIR/decoder.ckpt) and, for the stages
    of a larger ``a.size``, that size's own: DIR/size256/decoder.ckpt when there is one, else ``--decoder-init``'s
    (a decoder kept between machines in an exported pipeline folder, e.g. twig_core/demo_model_256)."""
    state = Checkpoint(work / "vae.ckpt").load()
    meta = json.loads((work / "vae_scale.json").read_text()) if (work / "vae_scale.json").exists() else {}
    vae = _vae_model(meta.get("scaling_factor"))
    vae.load_state_dict(state["model"])
    for folder in dict.fromkeys([work, work if a is None else _dit_work(work, a)]):
        tuned = Checkpoint(folder / "decoder.ckpt").load()
        if tuned is not None:  # the decoder stage changed the decoder only: latents encoded before it stay valid
            vae.load_state_dict(tuned["model"])
        elif folder != work and a.decoder_init:
            _kept_decoder(vae, Path(a.decoder_init))
    return vae.eval()


def _kept_decoder(vae, path: Path) -> None:
    """Put the decoder of ``path``'s DC-AE (a pipeline or vae folder as the export stage writes) into ``vae``. Its
    encoder must be ``vae``'s, as stored (fp16): the latents encoded here, and the DiT trained on them, stay valid."""
    from twig_core.errors import TwigError
    from twig_core.networks import load_vae

    try:
        kept = load_vae(path, dtype=torch.float32, lazy_encoder=False)  # a pipeline folder's vae/ or a vae folder
    except (OSError, TwigError) as e:
        raise SystemExit(f"--decoder-init {path}: no DC-AE there ({e})") from None
    mine, theirs = vae.encoder.state_dict(), kept.encoder.state_dict()
    if kept.config != vae.config or any(not torch.equal(v.half().float(), theirs[k]) for k, v in mine.items()):
        raise SystemExit(f"--decoder-init {path}: its DC-AE's encoder is not this work folder's")
    vae.decoder.load_state_dict(kept.decoder.state_dict())


def _text_and_dit(work: Path, tokenizer, pos_embed: bool = False, size: int = IMAGE_SIZE):
    from transformers import Gemma2Model

    from twig_core.text import TextEncoder
    from twig_core.transformer import TwigTransformer

    from .demo import DEMO_TRANSFORMER, demo_gemma_config

    torch.manual_seed(0)
    text = TextEncoder(Gemma2Model(demo_gemma_config(len(tokenizer))), tokenizer, instruction="")
    # positions of a larger grid are the 128² grid's, interpolated: the 128² weights start a larger model as they are
    cfg = DEMO_TRANSFORMER.replace(pos_embed=pos_embed, sample_size=size // 32,
                                   pos_interpolation_scale=size / IMAGE_SIZE)
    return text, TwigTransformer(cfg)


def _seeded(work: Path, stage: str) -> bool:
    """Whether DIR was filled by the seed stage (and ``stage``, one it replaces, is skipped)."""
    mark = work / "seed.json"
    if mark.exists():
        log(f"{stage}: skipped, {work} is seeded from {json.loads(mark.read_text())['from']}")
    return mark.exists()


def stage_seed(work: Path, a) -> None:
    from twig_core.loader import load_pipeline

    if _seeded(work, "seed"):
        return
    there = [n for n in SEEDED if (work / n).exists()]
    if there:
        raise SystemExit(f"{work} already holds {', '.join(there)}: seed an empty work folder")
    src = Path(a.seed_from)
    if not (src / "tokenizer").is_dir():
        raise SystemExit(f"{src}: not an exported pipeline folder (no tokenizer/)")
    parts = load_pipeline(src, dtype=torch.float32)
    parts.vae.load_encoder()  # the loader defers it until a first encode
    text, dit = _text_and_dit(work, _tokenizer(src), a.pos_embed)
    if parts.transformer.config != dit.config:
        raise SystemExit(f"{src / 'transformer'}: {parts.transformer.config} is not the recipe's 128² DiT {dit.config}"
                         " (give the same --pos-embed choice it was trained with)")
    vae = _vae_model(parts.vae.config.scaling_factor)
    if parts.vae.config != vae.config:
        raise SystemExit(f"{src / 'vae'}: {parts.vae.config} is not the recipe's DC-AE")
    try:
        text.model.load_state_dict(parts.text_encoder.model.state_dict())
        dit.load_state_dict(parts.transformer.state_dict())
    except RuntimeError as e:
        raise SystemExit(f"{src}: its text encoder or DiT is not the recipe's: {e}") from None
    shutil.copytree(src / "tokenizer", work / "tokenizer")
    Checkpoint(work / "vae.ckpt").save(model=parts.vae.state_dict())
    (work / "vae_scale.json").write_text(json.dumps({"scaling_factor": parts.vae.config.scaling_factor}))
    Checkpoint(work / "text.ckpt").save(text=text.model.state_dict())
    torch.save({"transformer": dit.state_dict(), "text": text.model.state_dict()}, work / "dit_ema.pt")
    (work / "seed.json").write_text(json.dumps({"from": str(src.resolve())}))
    log(f"seeded {work} from {src}")


def stage_data(work: Path, a) -> None:
    from .scenes import all_caption_texts, build_dataset
    from .tokenizer import train_tokenizer

    if not (work / "data" / "meta.json").exists():
        build_dataset(work / "data", n_train=a.n_train, n_heldout=400, seed=0, size=256, supersample=3)
    if not (work / "tokenizer" / "tokenizer.json").exists():
        train_tokenizer(all_caption_texts(_records(work, "train")[:3000]), work / "tokenizer")


def stage_vae(work: Path, a) -> None:
    if _seeded(work, "vae"):
        return
    images = _images(work, "train")
    vae, _ = train_vae(images, work, steps=a.vae_steps, batch=16, lr=1e-3, crop=64, full_from=0.9)
    (work / "vae_scale.json").write_text(json.dumps({"scaling_factor": latent_scale(vae, images)}))


def _mixed(a) -> bool:
    return a.mix_128 and a.size != IMAGE_SIZE


def stage_latents(work: Path, a) -> None:
    for size, out in ((a.size, _dit_work(work, a)), *([(IMAGE_SIZE, work)] if _mixed(a) else [])):
        if not (out / "latents.pt").exists():
            out.mkdir(exist_ok=True)
            torch.save(encode_all(_vae(work), _images(work, "train", size)), out / "latents.pt")


def stage_decoder(work: Path, a) -> None:
    if a.size == IMAGE_SIZE and _seeded(work, "decoder"):
        return
    # at a larger size the decoder goes on from the 128² one (or --decoder-init's) on that size's pictures, into
    # DIR/size256/decoder.ckpt
    finetune_decoder(_vae(work, a), _images(work, "train", a.size), _dit_work(work, a), steps=a.decoder_steps,
                     edge_weight=a.decoder_edge_weight)


def stage_text(work: Path, a) -> None:
    if _seeded(work, "text"):
        return
    from .text_pretrain import pretrain_text

    text, _ = _text_and_dit(work, _tokenizer(work))
    pretrain_text(_images(work, "train"), _records(work, "train"), text, work, steps=a.text_steps, batch=a.batch)


def _pretrained_text(work: Path, text) -> None:
    state = Checkpoint(work / "text.ckpt").load()
    if state is None:
        raise SystemExit(f"{work / 'text.ckpt'} not found: run --stage text first")
    text.model.load_state_dict(state["text"])


def _dit_weights(path: Path) -> dict:
    """The DiT weights of ``path``: a ``dit_ema.pt`` as this recipe writes, or the transformer of a pipeline
    folder as the export stage writes (a run continued from weights kept between machines, e.g. training/)."""
    if path.is_dir():
        from twig_core.networks import load_transformer

        return load_transformer(path, dtype=torch.float32).state_dict()  # a pipeline or a transformer folder
    if not path.is_file():
        raise SystemExit(f"--dit-init {path}: not found")
    return torch.load(path, map_location="cpu", weights_only=True)["transformer"]


def _init_dit(work: Path, a, dit) -> None:
    """A DiT stage that starts afresh begins from ``--dit-init`` (a ``dit_ema.pt`` or an exported pipeline folder),
    or at a larger size from the 128² result DIR/dit_ema.pt when there is one; every tensor must fit. A run with a
    checkpoint resumes from it instead."""
    if (_dit_work(work, a) / "dit.ckpt").exists():
        return
    path = Path(a.dit_init) if a.dit_init else work / "dit_ema.pt" if a.size != IMAGE_SIZE else None
    if path is None or not (a.dit_init or path.exists()):
        return
    from twig_core.errors import TwigError

    try:
        state = _dit_weights(path)
        dit.load_state_dict(state)
    except (KeyError, RuntimeError, TwigError) as e:
        raise SystemExit(f"{path}: not this recipe's DiT weights ({type(e).__name__}: {e})") from None
    log(f"the DiT starts from {path} ({len(state)} tensors)")


def stage_dit(work: Path, a) -> None:
    tok = _tokenizer(work)
    text, dit = _text_and_dit(work, tok, a.pos_embed, a.size)
    _pretrained_text(work, text)
    _init_dit(work, a, dit)
    dw = _dit_work(work, a)
    latents = [torch.load(d / "latents.pt", weights_only=True) for d in (dw, *([work] if _mixed(a) else []))]
    lengths = [n for n in a.dit_restart if n != "none"]
    rates = a.restart_lr if a.restart_lr is not None else RESTART_LR[:len(lengths)]
    if len(lengths) != len(rates):
        raise SystemExit(f"--dit-restart gives {len(lengths)} cycles but --restart-lr {len(rates)} rates")
    records = _records(work, "train")
    dit, text, _ = train_dit(latents, records, text, dit, dw, steps=a.dit_steps, batch=a.batch,
                             lr=a.lr, bf16=a.bf16, train_text=False, restarts=list(zip(lengths, rates)),
                             warmup=a.dit_warmup, save_seconds=60 * a.save_minutes,
                             weights=focus_weights(records, a.dit_focus) if a.dit_focus else None)
    torch.save({"transformer": dit.state_dict(), "text": text.model.state_dict()}, dw / "dit_ema.pt")


def _check_out(a) -> None:
    """Export writes, and eval scores, the pipeline in --out: at another size than 128² that is never the shipped
    128² model (which eval would draw at the wrong size)."""
    if a.size != 128 and Path(a.out).resolve() == DEMO_DIR.resolve():
        raise SystemExit(f"--size {a.size}: give --out (the {a.size}² pipeline); {DEMO_DIR} holds the shipped 128² "
                         "model")


def stage_export(work: Path, a) -> None:
    from .export import export_pipeline

    _check_out(a)
    tok = _tokenizer(work)
    text, dit = _text_and_dit(work, tok, a.pos_embed, a.size)
    dw = _dit_work(work, a)
    if (dw / "dit_ema.pt").exists():
        ema = torch.load(dw / "dit_ema.pt", weights_only=True)
        dit.load_state_dict(ema["transformer"])
        text.model.load_state_dict(ema["text"])
    else:  # training stopped early: the averaged DiT weights of the last checkpoint, the (frozen) text encoder
        state = Checkpoint(dw / "dit.ckpt").load()
        text.model.load_state_dict(state["text"])
        with torch.no_grad():
            for p, v in zip(dit.parameters(), state["ema"]):
                p.copy_(v)
        log(f"exporting the averaged weights of step {state['step']}")
    export_pipeline(Path(a.out), dit, _vae(work, a), text, dtype=torch.float16)
    log(f"exported to {a.out}")


def stage_eval(work: Path, a) -> None:
    from twig_core.loader import load_pipeline

    from .evaluate_demo import evaluate_demo, reference_report
    from .scenes import load_split

    _check_out(a)
    parts = load_pipeline(a.out, dtype=torch.float32)
    if a.int8:  # the fast preset's products (twig_core.int8)
        from twig_core import int8

        int8.enable(parts.transformer)
    records = _records(work, "heldout")
    ref = reference_report(parts.vae, records, load_split(work / "data", "heldout")[0], n=a.eval_n)
    print(ref["text"], flush=True)
    report = evaluate_demo(parts, records, n=a.eval_n, steps=a.eval_steps, cfg=a.eval_cfg, size=a.size,
                           cache=a.cache, cfg_interval=a.cfg_interval)
    print(report["text"])
    dw = _dit_work(work, a)
    (dw / "eval").mkdir(parents=True, exist_ok=True)
    for rec, en, zh in zip(records, report["images_en"], report["images_zh"]):
        en.save(dw / "eval" / f"{rec['id']}_en.png")
        zh.save(dw / "eval" / f"{rec['id']}_zh.png")
    summary = dict(report["summary"], shape_classifier=ref["classifier"]["accuracy"],
                   truth={k: v["accuracy"] for k, v in ref["truth"].items()},
                   dcae={size: dict({k: v["accuracy"] for k, v in r["aggregate"].items()},
                                    object_shape=r["objects"]["accuracy"]) for size, r in ref["dcae"].items()})
    (dw / (a.eval_out or "eval.json")).write_text(json.dumps(summary, indent=1))
    if a.eval_against:
        from .evaluate import format_change

        base = json.loads((dw / a.eval_against).read_text())
        if "verdicts" not in base:
            raise SystemExit(f"{dw / a.eval_against}: no per-picture verdicts (written by an older eval stage)")
        print(f"change against {a.eval_against}, picture by picture:\n"
              + format_change(base["verdicts"], summary["verdicts"]))


def stage_prompts(work: Path, a) -> None:
    from .evaluate import batch_rows

    rows = batch_rows(_records(work, "heldout")[: a.eval_n])
    out = work / "heldout_prompts.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    log(f"{len(rows)} prompts in {out}")


def stage_lora(work: Path, a) -> None:
    from .lora_demo import DEMO_LORA_NAME, report_pink, train_demo_lora

    out = train_demo_lora(a.out, work / "lora", Path(a.lora_out or DEMO_LORA_DIR / DEMO_LORA_NAME), steps=a.lora_steps)
    log(report_pink(a.out, out))


# every stage, in the order ``--stage all`` runs them (all but seed)
STAGES = {"seed": stage_seed, "data": stage_data, "vae": stage_vae, "latents": stage_latents, "decoder": stage_decoder,
          "text": stage_text, "dit": stage_dit, "export": stage_export, "eval": stage_eval,
          "prompts": stage_prompts, "lora": stage_lora}


def _focus(v: str) -> tuple[str, float]:
    name, _, factor = v.partition("=")
    try:
        f = float(factor)
    except ValueError:
        f = -1.0
    if not name or not f >= 0:
        raise argparse.ArgumentTypeError(f"{v!r}: give NAME=FACTOR, e.g. star=3")
    return name, f


def _steps_or_none(v: str):
    return v if v == "none" else int(v)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo256"]:
        from .recipe256 import main as recipe256

        return recipe256(argv[1:])
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["demo"], help="demo: the stages below; demo256: the 256² model's whole recipe "
                   "(python -m training demo256 --help)")
    p.add_argument("--work", required=True, help="working folder (data, checkpoints, logs)")
    p.add_argument("--stage", nargs="+", default=["all"], choices=(*STAGES, "all"),
                   help="the stages to run, in the order given (all: every stage but seed)")
    p.add_argument("--out", default=str(DEMO_DIR), help="where export writes the pipeline folder")
    p.add_argument("--from", dest="seed_from", default=str(DEMO_DIR),
                   help="seed: the exported pipeline folder to start from (default: the shipped model)")
    p.add_argument("--size", type=int, choices=(128, 256), default=128,
                   help="picture size of the latents, DiT, export and eval stages: 128 (4x4 latents, the shipped "
                        "model) or 256 (8x8, files in DIR/size256; its DiT starts from the 128² one; export "
                        "needs --out)")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--decoder-steps", type=int, default=1500)
    p.add_argument("--decoder-edge-weight", type=float, default=0.0,
                   help="extra weight of the pixels along object outlines in the decoder stage's loss (0: the "
                        "shipped recipe)")
    p.add_argument("--text-steps", type=int, default=3000)
    p.add_argument("--dit-steps", type=int, default=18000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dit-restart", type=_steps_or_none, nargs="*", default=[12000, 8000, 10000],
                   help="steps of each further DiT learning-rate cycle (warm restart) after --dit-steps; none: no "
                        "restart")
    p.add_argument("--restart-lr", type=float, nargs="*", default=None,
                   help=f"peak learning rate of each of those cycles (default {', '.join(map(str, RESTART_LR))})")
    p.add_argument("--dit-warmup", type=int, default=200, help="steps of learning-rate warm-up of each DiT cycle")
    p.add_argument("--dit-init", default=None,
                   help="dit: the weights a fresh DiT run starts from (a dit_ema.pt or an exported pipeline folder; "
                        "at --size 256 by default "
                        "DIR/dit_ema.pt, the 128² result, when there is one)")
    p.add_argument("--decoder-init", default=None,
                   help="at --size 256, while DIR/size256 has no decoder of its own: the decoder the decoder stage "
                        "goes on from and export and eval use (an exported pipeline folder's DC-AE, its encoder "
                        "this work folder's)")
    p.add_argument("--dit-focus", type=_focus, nargs="*", default=[],
                   help="dit: NAME=FACTOR ..., draw the scenes with an object of that shape, colour or position "
                        "FACTOR times as often (e.g. star=3 cross=2)")
    p.add_argument("--mix-128", action="store_true",
                   help="dit at --size 256: every other batch is a 128² one (DIR/latents.pt, which the latents stage "
                        "then writes too), so the one DiT draws both sizes")
    p.add_argument("--save-minutes", type=float, default=5.0,
                   help="dit: a checkpoint at least this often (and every 100 steps)")
    p.add_argument("--fp32", dest="bf16", action="store_false", help="no bfloat16 autocast in the DiT stage")
    p.add_argument("--pos-embed", action=argparse.BooleanOptionalAction, default=True,
                   help="DiT with the sin-cos positional embedding (as Sana's 2K/4K models; default), or without "
                        "(as Sana 1600M 1024px); give the same choice to dit and export")
    p.add_argument("--lora-steps", type=int, default=1000)
    p.add_argument("--lora-out", default=None, help="where the lora stage writes the adapter (default: "
                   "twig_core/demo_loras/twig_demo_pink.safetensors)")
    p.add_argument("--eval-n", type=int, default=400)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-cfg", type=float, default=4.5)
    p.add_argument("--cache", type=float, default=0.0, help="eval: step-cache threshold (0 = off)")
    p.add_argument("--cfg-interval", type=parse_cfg_interval, default=None, metavar="LO,HI",
                   help="eval: classifier-free guidance only for sigmas in LO … HI")
    p.add_argument("--int8", action="store_true", help="eval: the transformer's int8 products (the fast preset)")
    p.add_argument("--eval-out", default=None, help="eval: the summary's file name in --work (default eval.json)")
    p.add_argument("--eval-against", default=None, metavar="NAME.json",
                   help="eval: also print each category's change against an earlier summary in --work, picture by "
                        "picture (pictures lost and gained, standard error of the change)")
    a = p.parse_args(argv)
    a.dit_focus = dict(a.dit_focus)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    names = [n for s in a.stage for n in ([k for k in STAGES if k != "seed"] if s == "all" else [s])]
    for name in names:
        log(f"stage {name}")
        STAGES[name](work, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
