"""Write trained parts as a diffusers-layout pipeline folder, the form the loader (and diffusers) read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from twig_core.keymap import ours_to_diffusers


def _save(sd: dict, path: Path, dtype) -> None:
    # "format": "pt" lets older transformers releases (4.4x, as WebUIs ship) read the Gemma weights too
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")


def export_vae(folder: Path, vae, dtype=torch.float16) -> None:
    """A DC-AE as a diffusers ``AutoencoderDC`` folder (config.json + safetensors), weights stored in ``dtype``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    _json(Path(folder) / "config.json", {"_class_name": "AutoencoderDC", **vae.config.to_dict()})
    _save(vae.state_dict(), Path(folder) / "diffusion_pytorch_model.safetensors", dtype)


def export_pipeline(out: Path, transformer, vae, text_encoder, dtype=torch.float16) -> None:
    """out/{transformer,vae,text_encoder,tokenizer}/ + model_index.json, weights stored in ``dtype``."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
        (out / sub).mkdir(parents=True)
    _json(out / "model_index.json", {
        "_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"], "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    })
    _json(out / "transformer" / "config.json", transformer.config.to_diffusers_config())
    _save(ours_to_diffusers(transformer.state_dict()), out / "transformer" / "diffusion_pytorch_model.safetensors", dtype)
    export_vae(out / "vae", vae, dtype)
    text_encoder.model.config.save_pretrained(out / "text_encoder")
    _save(text_encoder.model.state_dict(), out / "text_encoder" / "model.safetensors", dtype)
    _json(out / "text_encoder" / "twig_text.json", {"instruction": text_encoder.instruction.split("\n")
                                                    if text_encoder.instruction else []})
    text_encoder.tokenizer.save_pretrained(out / "tokenizer")
    # name a class every transformers release knows, not the backend class newer releases record
    cfg_path = out / "tokenizer" / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _json(cfg_path, tok_cfg)
