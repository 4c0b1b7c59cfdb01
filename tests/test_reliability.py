"""No state survives a failed or finished run: an interrupt in the middle of text encoding, sampling, decoding
or TIPO leaves every cache usable (the next run equals a run on freshly loaded models), and ComfyUI prompts run
back to back — other models in between, or the same prompt twice — give the images of separate fresh runs.
Tensors are compared exactly, in-process; the nodes are called as the host calls them."""

from __future__ import annotations

import pytest
import torch

from twig_core import loader
from twig_core.pipeline import generate

RUN = dict(width=128, height=96, steps=3, cfg=4.5, seed=11)
PROMPT = "a red circle on the left, 左边一个红色的圆"


class Interrupted(Exception):
    """What a host's interrupt looks like from inside a run: an exception out of a hook or callback."""


def interrupt_first_call(module: torch.nn.Module):
    """The first forward of ``module`` or any module inside it raises Interrupted (once): the run stops
    wherever that lands, as a host's interrupt would."""
    def hook(mod, args):
        for h in handles:
            h.remove()
        raise Interrupted()

    handles = [m.register_forward_pre_hook(hook) for m in module.modules()]


def _run(parts, callback=None):
    return generate(parts.transformer, parts.vae, parts.text_encoder, PROMPT, "blurry", callback=callback, **RUN)


def test_an_interrupt_in_text_encoding_sampling_or_decoding_leaves_every_cache_usable(tiny_pipeline):
    want = _run(loader.load_pipeline(tiny_pipeline))
    parts = loader.load_pipeline(tiny_pipeline)

    def stop_at_step_1(state):
        if state["i"] == 1:
            raise Interrupted()

    arm = {
        "text encoding": lambda: interrupt_first_call(parts.text_encoder.model.layers[-1]),
        "decode": lambda: interrupt_first_call(parts.vae.decoder),
        "sampling": lambda: None,
    }
    for where, setup in arm.items():
        setup()
        with pytest.raises(Interrupted):
            _run(parts, stop_at_step_1 if where == "sampling" else None)
        assert torch.equal(_run(parts), want), where


def test_an_interrupt_during_tipo_leaves_the_model_usable():
    from tests.builders import build_tiny_tipo, build_tiny_tipo_tokenizer
    from twig_core.tipo import TipoModel, expand
    from twig_core.tipo.model import Sampling

    tok = build_tiny_tipo_tokenizer()
    sampling = Sampling(temperature=0.5, top_p=0.95, top_k=80, min_p=0.05, max_new_tokens=24)
    want = expand(TipoModel(build_tiny_tipo(tok), tok), "1girl, red hair", seed=7, sampling=sampling, max_retries=1)
    model = TipoModel(build_tiny_tipo(tok), tok)
    count = 0

    def stop_after_5_tokens(n):
        nonlocal count
        count += 1
        if count == 5:
            raise Interrupted()

    with pytest.raises(Interrupted):
        expand(model, "1girl, red hair", seed=7, sampling=sampling, max_retries=1, callback=stop_after_5_tokens)
    got = expand(model, "1girl, red hair", seed=7, sampling=sampling, max_retries=1)
    assert got.prompt == want.prompt and [p.output for p in got.passes] == [p.output for p in want.passes]


# ---------------------------------------------------------------------------------------------------
# ComfyUI prompts back to back, at the node level


def _prompt(models, te_name: str, positive: str, seed: int):
    """One queued prompt: loaders → text encode → empty latent → sampler → decode, as the host calls them."""
    from nodes.conditioning import TwigTextEncode
    from nodes.latent import TwigEmptyLatent, TwigVAEDecode
    from nodes.loaders import TwigModelLoader, TwigTextEncoderLoader, TwigVAELoader
    from nodes.sampling import TwigSampler

    (model,) = TwigModelLoader().load(models["model"], "fp32")
    (te,) = TwigTextEncoderLoader().load(te_name, 300, "cpu", "fp32")
    (vae,) = TwigVAELoader().load(models["vae"], "fp32")
    pos, neg = TwigTextEncode().encode(te, positive, "blurry")["result"][:2]
    latent = TwigEmptyLatent().generate("custom", 96, 64)[0]
    (out,) = TwigSampler().sample(model, pos, neg, latent, seed, 3, 4.5, "flow_dpmpp_2m", 3.0, 1.0)
    return TwigVAEDecode().decode(out, vae, 0)[0]


def test_prompts_back_to_back_give_the_images_of_fresh_runs(tmp_path, monkeypatch):
    from tests.builders import write_model_folders

    names = write_model_folders(tmp_path, "a")
    other = write_model_folders(tmp_path, "b")  # the same networks written again under other names
    from tests.builders import save_tiny_gemma2_folder

    save_tiny_gemma2_folder(tmp_path / "text_encoders" / "c_gemma", seed=3)  # a different text encoder
    monkeypatch.setenv("TWIG_MODELS_DIR", str(tmp_path))
    from nodes import host

    def fresh(*args):
        host.release_all()
        return _prompt(*args)

    first = _prompt(names, names["text_encoder"], PROMPT, 5)
    again = _prompt(names, names["text_encoder"], PROMPT, 5)  # the same prompt twice: caches hit
    switched = _prompt(other, "c_gemma/", PROMPT, 5)  # other models between
    back = _prompt(names, names["text_encoder"], PROMPT, 5)
    assert torch.equal(first, again) and torch.equal(first, back)
    assert torch.equal(switched, fresh(other, "c_gemma/", PROMPT, 5))
    assert torch.equal(first, fresh(names, names["text_encoder"], PROMPT, 5))
    assert not torch.equal(first, switched)  # the other text encoder did change the picture


def test_face_detectors_run_back_to_back_give_the_same_faces():
    """Each detector's session (OpenCV cascades, mediapipe graphs, YOLO, the ensemble) gives the same faces and
    mask when run again after the others, as in a fresh process."""
    import os
    from pathlib import Path

    import numpy as np

    from nodes.face import TwigFaceDetect
    from twig_core.face import detect as fdetect

    data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photograph")
    from PIL import Image

    photo = np.asarray(Image.open(Path(os.path.dirname(data.__file__)) / "astronaut.png").convert("RGB"))
    image = torch.from_numpy(photo.copy())[None].float() / 255.0
    ready = [n for n, why in fdetect.available_detectors().items() if why is None]
    if not ready:
        pytest.skip("no face detector installed")

    def run(name):
        out = TwigFaceDetect().detect(image, name, 0.3, "auto", 0, 0.0, 1.0, "left-right", 0)
        faces, mask = out["result"][:2]
        return [d.box for d in faces.detections[0]], [d.confidence for d in faces.detections[0]], mask

    first = {name: run(name) for name in ready}
    for name in reversed(ready):
        boxes, scores, mask = run(name)
        assert boxes == first[name][0] and scores == first[name][1] and torch.equal(mask, first[name][2]), name
