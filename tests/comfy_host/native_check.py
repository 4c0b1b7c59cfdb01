"""Twig's native path in a real ComfyUI (run by run_check.sh against a running server with the embedded demo
model): the same seed and noise through core samplers on "Twig → native MODEL" and through Twig Sampler give the
same latent, compared in fp32 (the latents saved by core Save Latent), and the core VAE nodes decode and encode.

    python native_check.py --url URL --output OUTPUT_DIR

Compared (demo model, 128², flow shift 3.0), as max |difference| of the model-space latents in fp32:
  core SamplerCustom (euler, Twig Flow Sigmas flow_euler, 4 steps) vs Twig Sampler flow_euler, 4 steps:
    CFG 1.0 below EXACT_TOLERANCE (measured 1.4e-6: the same arithmetic up to fp32 rounding), and
    CFG 4.5 below CFG_TOLERANCE (measured 9.3e-6): ComfyUI mixes guidance on x0, Twig on the velocity (the same in
    exact arithmetic); the demo model amplifies rounding strongly (at 256² scaling its prompt states by 1 + 1e-6
    moves a 3-step CFG 4.5 result by 1.3e-2), hence the margin, still far below what a lost attention mask (a
    change of about 3 in a single model call) or a wrong timestep gives
  core KSampler (euler, simple, 1 step, CFG 4.5) vs Twig Sampler flow_euler, 1 step: below CFG_TOLERANCE (measured
    3.8e-6; the two schedules agree at one step, over more steps ComfyUI's "simple" spacing differs from Twig's)
  core KSampler (sampler and scheduler twig_flow_dpmpp_2m, which the pack adds to core's lists, 4 steps, CFG 4.5)
    vs Twig Sampler flow_dpmpp_2m, 4 steps: below CFG_TOLERANCE (measured 1.1e-5)
  the same two with the demo LoRA (twig_demo_pink): Twig LoRA Loader (native MODEL) through ComfyUI's patches on
    the native MODEL vs Twig LoRA Loader on the Twig model: below CFG_TOLERANCE, and the LoRA moves the latent by
    more than LORA_CHANGE
Decoded images are compared in 8-bit PNGs (core VAE Decode vs Twig VAE Decode within 3/255, tiled vs untiled 2/255).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import client as C  # noqa: E402

DEMO = "twig-demo (embedded)"
SCALE = 0.41407  # the DC-AE scaling factor: native (ComfyUI) latents are model-space latents / SCALE
EXACT_TOLERANCE = 1e-4
CFG_TOLERANCE = 1e-3
LORA_CHANGE = 1e-2
LORA = "twig_demo_pink.safetensors"
SEED, CFG = 21, 4.5


LATENTS = ("twig", "custom", "twig_c1", "custom_c1", "ks", "twig1", "ks_dpm", "twig_dpm", "ks_lora", "twig_lora",
           "reenc")


def graph(steps: int) -> dict:
    """Twig Sampler and two core samplers on the same prompt, seed and empty latent; every latent saved."""

    def core_twig_dpm(model):  # core KSampler with Twig's DPM-Solver++ sampler and schedule from its lists
        return {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": steps, "cfg": CFG, "sampler_name": "twig_flow_dpmpp_2m",
            "scheduler": "twig_flow_dpmpp_2m", "positive": ["nenc", 0], "negative": ["nenc", 1],
            "latent_image": ["lat", 0], "denoise": 1.0}}

    def twig_dpm(model):
        return {"class_type": "TwigSampler", "inputs": {
            "model": model, "positive": ["enc", 0], "negative": ["enc", 1], "latent": ["lat", 0], "seed": SEED,
            "steps": steps, "cfg": CFG, "sampler": "flow_dpmpp_2m", "shift": 3.0, "denoise": 1.0}}

    g = {
        "m": {"class_type": "TwigModelLoader", "inputs": {"model_name": DEMO, "dtype": "fp32"}},
        "te": {"class_type": "TwigTextEncoderLoader", "inputs": {"text_encoder_name": DEMO, "max_tokens": 300,
                                                                    "device": "cpu", "dtype": "fp32"}},
        "v": {"class_type": "TwigVAELoader", "inputs": {"vae_model": DEMO, "dtype": "fp32"}},
        "enc": {"class_type": "TwigTextEncode", "inputs": {"text_encoder": ["te", 0], "positive": "a red circle on the left",
                                                             "negative": "", "unload_after": False}},
        "nenc": {"class_type": "TwigTextEncodeNative", "inputs": {"text_encoder": ["te", 0],
                                                                   "positive": "a red circle on the left", "negative": "",
                                                                   "unload_after": False}},
        "lat": {"class_type": "TwigEmptyLatent", "inputs": {"aspect_ratio": "1024x1024 (1.00:1)", "width": 1024,
                                                            "height": 1024, "batch_size": 1, "model": ["m", 0]}},
        "nm": {"class_type": "TwigToNativeModel", "inputs": {"model": ["m", 0]}},
        "nv": {"class_type": "TwigToNativeVAE", "inputs": {"vae": ["v", 0]}},
        "twig": {"class_type": "TwigSampler", "inputs": {
            "model": ["m", 0], "positive": ["enc", 0], "negative": ["enc", 1], "latent": ["lat", 0], "seed": SEED,
            "steps": steps, "cfg": CFG, "sampler": "flow_euler", "shift": 3.0, "denoise": 1.0}},
        "sig": {"class_type": "TwigFlowSigmas", "inputs": {"steps": steps, "schedule": "flow_euler", "shift": 3.0,
                                                           "denoise": 1.0}},
        "sel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "custom": {"class_type": "SamplerCustom", "inputs": {
            "model": ["nm", 0], "add_noise": True, "noise_seed": SEED, "cfg": CFG, "positive": ["nenc", 0],
            "negative": ["nenc", 1], "sampler": ["sel", 0], "sigmas": ["sig", 0], "latent_image": ["lat", 0]}},
        "twig_c1": {"class_type": "TwigSampler", "inputs": {
            "model": ["m", 0], "positive": ["enc", 0], "negative": ["enc", 1], "latent": ["lat", 0], "seed": SEED,
            "steps": steps, "cfg": 1.0, "sampler": "flow_euler", "shift": 3.0, "denoise": 1.0}},
        "custom_c1": {"class_type": "SamplerCustom", "inputs": {
            "model": ["nm", 0], "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": ["nenc", 0],
            "negative": ["nenc", 1], "sampler": ["sel", 0], "sigmas": ["sig", 0], "latent_image": ["lat", 0]}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["nm", 0], "seed": SEED, "steps": 1, "cfg": CFG, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["nenc", 0], "negative": ["nenc", 1], "latent_image": ["lat", 0], "denoise": 1.0}},
        "twig1": {"class_type": "TwigSampler", "inputs": {
            "model": ["m", 0], "positive": ["enc", 0], "negative": ["enc", 1], "latent": ["lat", 0], "seed": SEED,
            "steps": 1, "cfg": CFG, "sampler": "flow_euler", "shift": 3.0, "denoise": 1.0}},
        "ks_dpm": core_twig_dpm(["nm", 0]),
        "twig_dpm": twig_dpm(["m", 0]),
        # a LoRA on each path: ComfyUI's patches on the native MODEL, Twig's adapters on the Twig model
        "nl": {"class_type": "TwigLoraLoaderNative", "inputs": {"model": ["nm", 0], "lora": LORA,
                                                                "strength": 1.0}},
        "tl": {"class_type": "TwigLoraLoader", "inputs": {"model": ["m", 0], "lora": LORA, "strength": 1.0}},
        "ks_lora": core_twig_dpm(["nl", 0]),
        "twig_lora": twig_dpm(["tl", 0]),
        # the core VAE nodes on the native VAE: decode, tiled decode, encode
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["custom", 0], "vae": ["nv", 0]}},
        "dect": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["custom", 0], "vae": ["nv", 0], "tile_size": 64,
                                                            "overlap": 0, "temporal_size": 64, "temporal_overlap": 8}},
        "twigdec": {"class_type": "TwigVAEDecode", "inputs": {"samples": ["twig", 0], "vae": ["v", 0], "tile_size": 0}},
        "reenc": {"class_type": "VAEEncode", "inputs": {"pixels": ["dec", 0], "vae": ["nv", 0]}},
    }
    for key in LATENTS:
        g[f"save_{key}"] = {"class_type": "SaveLatent", "inputs": {"samples": [key, 0], "filename_prefix": f"latents/twignative_{key}"}}
    for key in ("dec", "dect", "twigdec"):
        g[f"img_{key}"] = {"class_type": "SaveImage", "inputs": {"images": [key, 0], "filename_prefix": f"twignative_{key}"}}
    return g


def _read(entry: dict, node: str, output_dir: str, kind: str):
    item = entry["outputs"][node][kind][0]
    path = os.path.join(output_dir, item.get("subfolder", ""), item["filename"])
    if kind == "latents":
        from safetensors.torch import load_file

        return load_file(path)["latent_tensor"].float()
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)


def check(url: str, output_dir: str, steps: int = 4) -> None:
    entry = C.wait_history(url, C.queue_prompt(url, graph(steps)), timeout=1800)
    if entry["status"]["status_str"] != "success":
        err = C.messages(entry).get("execution_error", {})
        raise C.CheckFailed(f"native graph failed in {err.get('node_type')}: {err.get('exception_type')}: "
                            f"{err.get('exception_message')}")
    lat = {k: _read(entry, f"save_{k}", output_dir, "latents") for k in LATENTS}
    img = {k: _read(entry, f"img_{k}", output_dir, "images") for k in ("dec", "dect", "twigdec")}
    d_c1 = (lat["custom_c1"] * SCALE - lat["twig_c1"]).abs().max().item()
    d_custom = (lat["custom"] * SCALE - lat["twig"]).abs().max().item()
    d_ks = (lat["ks"] * SCALE - lat["twig1"]).abs().max().item()
    d_dpm = (lat["ks_dpm"] * SCALE - lat["twig_dpm"]).abs().max().item()
    d_lora = (lat["ks_lora"] * SCALE - lat["twig_lora"]).abs().max().item()
    moved = (lat["twig_lora"] - lat["twig_dpm"]).abs().max().item()
    scale = lat["twig"].abs().max().item()
    C.log(f"native vs Twig Sampler, model-space latents (fp32, |latent| up to {scale:.2f}), max |difference|: "
          f"SamplerCustom + Twig Flow Sigmas {steps} steps: CFG 1 {d_c1:.2e}, CFG {CFG} {d_custom:.2e}; "
          f"KSampler euler/simple 1 step CFG {CFG}: {d_ks:.2e}; KSampler twig_flow_dpmpp_2m {steps} steps: "
          f"{d_dpm:.2e}, with {LORA}: {d_lora:.2e} (the LoRA moves the latent by {moved:.2e})")
    C.expect(d_c1 < EXACT_TOLERANCE, f"SamplerCustom (euler, Twig Flow Sigmas, CFG 1) matches Twig Sampler "
                                     f"flow_euler: {d_c1:.2e} < {EXACT_TOLERANCE}")
    C.expect(d_custom < CFG_TOLERANCE, f"SamplerCustom (euler, Twig Flow Sigmas, CFG {CFG}) matches Twig Sampler "
                                       f"flow_euler: {d_custom:.2e} < {CFG_TOLERANCE}")
    C.expect(d_ks < CFG_TOLERANCE, f"KSampler (euler, simple) matches Twig Sampler flow_euler at 1 step: "
                                   f"{d_ks:.2e} < {CFG_TOLERANCE}")
    C.expect(d_dpm < CFG_TOLERANCE, f"KSampler (twig_flow_dpmpp_2m sampler and scheduler) matches Twig Sampler "
                                    f"flow_dpmpp_2m: {d_dpm:.2e} < {CFG_TOLERANCE}")
    C.expect(d_lora < CFG_TOLERANCE, f"KSampler on Twig LoRA Loader (native MODEL) matches Twig Sampler on Twig LoRA "
                                     f"Loader: {d_lora:.2e} < {CFG_TOLERANCE}")
    C.expect(moved > LORA_CHANGE, f"the LoRA changes the latent: {moved:.2e} > {LORA_CHANGE}")
    d_img = (img["dec"] - img["twigdec"]).abs().max().item()
    C.expect(d_img <= 3 / 255, f"core VAE Decode of the native latent matches Twig VAE Decode of Twig's: {d_img * 255:.1f}/255")
    d_tiled = (img["dect"] - img["dec"]).abs().max().item()
    C.expect(d_tiled <= 2 / 255, f"core VAE Decode (Tiled) matches VAE Decode: {d_tiled * 255:.1f}/255")
    C.expect(tuple(lat["reenc"].shape) == tuple(lat["custom"].shape),
             f"core VAE Encode gives a native latent of the sampler's shape {tuple(lat['reenc'].shape)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--output", required=True)
    a = ap.parse_args()
    try:
        check(a.url, a.output)
    except C.CheckFailed as e:
        C.log(f"FAILED: {e}")
        return 1
    C.log("native path checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
