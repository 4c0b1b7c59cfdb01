"""Reproduce the embedded demo model: ``python -m training demo --work DIR [--stage STAGE]``.

Stages run in order and each resumes from what the previous run left in DIR:
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
``--stage all`` runs everything that is not finished yet. Fixed seeds throughout. ``--size 256`` runs the latents,
dit, export and eval stages on 256² pictures (8x8 latents, the DC-AE keeps their shapes; files in DIR/size256).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from twig_core.catalog import DEMO_DIR, DEMO_LORA_DIR
from twig_core.sampling import parse_cfg_interval

from .trainer import (Checkpoint, downsample_u8, encode_all, finetune_decoder, latent_scale, log, train_dit,
                      train_vae)


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


def _vae(work: Path):
    from twig_core.dcae import DCAE

    from .demo import DEMO_DCAE

    state = Checkpoint(work / "vae.ckpt").load()
    meta = json.loads((work / "vae_scale.json").read_text()) if (work / "vae_scale.json").exists() else {}
    vae = DCAE(DEMO_DCAE.replace(scaling_factor=meta.get("scaling_factor", DEMO_DCAE.scaling_factor)))
    vae.load_state_dict(state["model"])
    tuned = Checkpoint(work / "decoder.ckpt").load()
    if tuned is not None:  # the decoder stage changed the decoder only: latents encoded before it stay valid
        vae.load_state_dict(tuned["model"])
    return vae.eval()


def _text_and_dit(work: Path, tokenizer, pos_embed: bool = False, size: int = 128):
    from transformers import Gemma2Model

    from twig_core.text import TextEncoder
    from twig_core.transformer import TwigTransformer

    from .demo import DEMO_TRANSFORMER, demo_gemma_config

    torch.manual_seed(0)
    text = TextEncoder(Gemma2Model(demo_gemma_config(len(tokenizer))), tokenizer, instruction="")
    return text, TwigTransformer(DEMO_TRANSFORMER.replace(pos_embed=pos_embed, sample_size=size // 32))


def stage_data(work: Path, a) -> None:
    from .scenes import all_caption_texts, build_dataset
    from .tokenizer import train_tokenizer

    if not (work / "data" / "meta.json").exists():
        build_dataset(work / "data", n_train=a.n_train, n_heldout=400, seed=0, size=256, supersample=3)
    if not (work / "tokenizer" / "tokenizer.json").exists():
        train_tokenizer(all_caption_texts(_records(work, "train")[:3000]), work / "tokenizer")


def stage_vae(work: Path, a) -> None:
    images = _images(work, "train")
    vae, _ = train_vae(images, work, steps=a.vae_steps, batch=16, lr=1e-3, crop=64, full_from=0.9)
    (work / "vae_scale.json").write_text(json.dumps({"scaling_factor": latent_scale(vae, images)}))


def stage_latents(work: Path, a) -> None:
    out = _dit_work(work, a) / "latents.pt"
    if out.exists():
        return
    vae = _vae(work)
    out.parent.mkdir(exist_ok=True)
    torch.save(encode_all(vae, _images(work, "train", a.size)), out)


def stage_decoder(work: Path, a) -> None:
    finetune_decoder(_vae(work), _images(work, "train"), work, steps=a.decoder_steps, edge_weight=a.decoder_edge_weight)


def stage_text(work: Path, a) -> None:
    from .text_pretrain import pretrain_text

    text, _ = _text_and_dit(work, _tokenizer(work))
    pretrain_text(_images(work, "train"), _records(work, "train"), text, work, steps=a.text_steps, batch=a.batch)


def _pretrained_text(work: Path, text) -> None:
    state = Checkpoint(work / "text.ckpt").load()
    if state is None:
        raise SystemExit(f"{work / 'text.ckpt'} not found: run --stage text first")
    text.model.load_state_dict(state["text"])


def stage_dit(work: Path, a) -> None:
    tok = _tokenizer(work)
    text, dit = _text_and_dit(work, tok, a.pos_embed, a.size)
    _pretrained_text(work, text)
    dw = _dit_work(work, a)
    latents = torch.load(dw / "latents.pt", weights_only=True)
    if len(a.dit_restart) != len(a.restart_lr):
        raise SystemExit(f"--dit-restart gives {len(a.dit_restart)} cycles but --restart-lr {len(a.restart_lr)} rates")
    restarts = list(zip(a.dit_restart, a.restart_lr))
    dit, text, _ = train_dit(latents, _records(work, "train"), text, dit, dw, steps=a.dit_steps, batch=a.batch,
                             lr=a.lr, bf16=a.bf16, train_text=False, restarts=restarts)
    torch.save({"transformer": dit.state_dict(), "text": text.model.state_dict()}, dw / "dit_ema.pt")


def stage_export(work: Path, a) -> None:
    from .export import export_pipeline

    if a.size != 128 and Path(a.out).resolve() == DEMO_DIR.resolve():
        raise SystemExit(f"--size {a.size}: give --out; {DEMO_DIR} holds the shipped 128² model")
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
    export_pipeline(Path(a.out), dit, _vae(work), text, dtype=torch.float16)
    log(f"exported to {a.out}")


def stage_eval(work: Path, a) -> None:
    from twig_core.loader import load_pipeline

    from .evaluate_demo import evaluate_demo, reference_report
    from .scenes import load_split

    parts = load_pipeline(a.out, dtype=torch.float32)
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


# every stage, in the order ``--stage all`` runs them
STAGES = {"data": stage_data, "vae": stage_vae, "latents": stage_latents, "decoder": stage_decoder,
          "text": stage_text, "dit": stage_dit, "export": stage_export, "eval": stage_eval,
          "prompts": stage_prompts, "lora": stage_lora}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["demo"])
    p.add_argument("--work", required=True, help="working folder (data, checkpoints, logs)")
    p.add_argument("--stage", default="all", choices=(*STAGES, "all"))
    p.add_argument("--out", default=str(DEMO_DIR), help="where export writes the pipeline folder")
    p.add_argument("--size", type=int, choices=(128, 256), default=128,
                   help="picture size of the latents, DiT, export and eval stages: 128 (4x4 latents, the shipped "
                        "model) or 256 (8x8, files in DIR/size256; untrained so far: export needs --out)")
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
    p.add_argument("--dit-restart", type=int, nargs="*", default=[12000, 8000, 10000],
                   help="steps of each further DiT learning-rate cycle (warm restart) after --dit-steps; none: no "
                        "restart")
    p.add_argument("--restart-lr", type=float, nargs="*", default=[2e-4, 1.5e-4, 1.5e-4],
                   help="peak learning rate of each of those cycles")
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
    p.add_argument("--eval-out", default=None, help="eval: the summary's file name in --work (default eval.json)")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for name in STAGES if a.stage == "all" else (a.stage,):
        log(f"stage {name}")
        STAGES[name](work, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
