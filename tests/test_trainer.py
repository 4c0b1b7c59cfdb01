"""The demo trainer's stages learn on a tiny fixed batch and resume from their checkpoints."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.builders import TINY_DCAE, TINY_TRANSFORMER, build_tiny_gemma2, build_tiny_gemma_tokenizer
from twig_core.text import TextEncoder
from twig_core.dcae import DCAE
from twig_core.errors import TwigError
from training.trainer import downsample_u8, finetune_decoder, focus_weights, recon_loss, train_dit, train_vae
from twig_core.transformer import TwigTransformer


def pictures(n=4, size=64):
    rng = np.random.default_rng(0)
    img = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        c = rng.integers(0, 255, 3)
        y, x = rng.integers(0, size // 2, 2)
        img[i, y:y + size // 2, x:x + size // 2] = c
    return img


def test_vae_stage_loss_falls_and_resumes(tmp_path):
    imgs = pictures()
    _, losses = train_vae(imgs, tmp_path, steps=30, batch=4, lr=3e-3, crop=64, config=TINY_DCAE, save_every=10)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    _, more = train_vae(imgs, tmp_path, steps=32, batch=4, lr=3e-3, crop=64, config=TINY_DCAE)
    assert len(more) == 2  # picked up at step 30


def test_decoder_stage_trains_the_decoder_only_and_resumes(tmp_path):
    imgs = pictures()
    torch.manual_seed(0)
    vae = DCAE(TINY_DCAE)
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    _, losses = finetune_decoder(vae, imgs, tmp_path, steps=30, batch=4, lr=3e-3, save_every=10)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(torch.equal(v, vae.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not all(torch.equal(v, vae.decoder.state_dict()[k]) for k, v in decoder.items())
    assert all(p.requires_grad for p in vae.parameters())  # handed back trainable as it came
    torch.manual_seed(1)
    _, more = finetune_decoder(DCAE(TINY_DCAE), imgs, tmp_path, steps=32, batch=4, lr=3e-3)
    assert len(more) == 2  # picked up at step 30
    assert np.mean(more) < 0.7 * np.mean(losses[:5])  # with the trained decoder from the checkpoint


def test_object_weighted_loss_counts_object_pixels_more():
    x = -torch.ones(1, 3, 8, 8)  # black background
    x[..., :2, :2] = 1.0  # a small white object: 4 of 64 pixels
    off_object, off_background = x.clone(), x.clone()
    off_object[..., 0, 0] = 0.0
    off_background[..., 7, 7] = 0.0
    assert torch.allclose(recon_loss(off_object, x), recon_loss(off_background, x))
    assert torch.allclose(recon_loss(off_object, x, 4.0), 5 * recon_loss(off_background, x, 4.0))
    assert torch.equal(recon_loss(off_object, x), F.l1_loss(off_object, x) + F.mse_loss(off_object, x))


def test_edge_weighted_loss_counts_outline_pixels_more():
    x = -torch.ones(1, 3, 12, 12)  # black background
    x[..., 2:8, 2:8] = 1.0  # a white square: its outline is rows/columns 1-2 and 7-8
    on_edge, inside, far = x.clone(), x.clone(), x.clone()
    on_edge[..., 2, 4] = 0.0  # the square's top row, next to the background
    inside[..., 5, 5] = 0.0  # the middle of the square
    far[..., 11, 11] = 0.0  # background far from the square
    assert torch.allclose(recon_loss(on_edge, x, 0.0, 3.0), 4 * recon_loss(far, x, 0.0, 3.0))
    assert torch.allclose(recon_loss(inside, x, 0.0, 3.0), recon_loss(far, x, 0.0, 3.0))
    assert torch.allclose(recon_loss(on_edge, x, 4.0, 3.0), 8 * recon_loss(far, x, 4.0, 3.0))  # both weights add


def test_dit_stage_loss_falls(tmp_path):
    tok = build_tiny_gemma_tokenizer()
    text = TextEncoder(build_tiny_gemma2(tok), tok, instruction="")
    torch.manual_seed(0)
    dit = TwigTransformer(TINY_TRANSFORMER)
    latents = torch.randn(2, 32, 2, 2)
    records = [{"captions": [{"en": "a red circle", "zh": "一个红色的圆"}]},
               {"captions": [{"en": "two blue squares", "zh": "两个蓝色的正方形"}]}]
    _, _, losses = train_dit(latents, records, text, dit, tmp_path, steps=60, batch=8, lr=3e-3, max_length=16)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert not dit.training


def scene_records():
    def rec(color, shape, centres, en, zh):
        inst = [{"cx": x, "cy": y, "r": 0.1} for x, y in centres]
        return {"scene": {"groups": [{"color": color, "shape": shape, "count": len(inst), "instances": inst}]},
                "captions": [{"en": en, "zh": zh}]}
    return [rec("red", "circle", [(0.25, 0.5)], "a red circle on the left", "左边一个红色的圆"),
            rec("blue", "square", [(0.2, 0.3), (0.5, 0.3), (0.8, 0.6)], "three blue squares", "三个蓝色的正方形")]


def test_layout_and_object_targets_follow_the_scene():
    from training.scenes import COLOR_NAMES, OBJECT_COLORS, PALETTE, SHAPES
    from training.text_pretrain import layout_targets, object_targets

    img = np.zeros((1, 64, 64, 3), np.uint8)
    img[:] = PALETTE["white"]
    img[0, :, :32] = PALETTE["red"]  # left half red
    img[0, 40:48, 56:64] = PALETTE["blue"]  # cell (5, 7) of an 8x8 grid
    cells = layout_targets(img, grid=8).view(8, 8)
    assert (cells[:, :4] == COLOR_NAMES.index("red")).all()
    assert cells[5, 7] == COLOR_NAMES.index("blue")
    assert cells[0, 7] == COLOR_NAMES.index("white")
    counts, shapes, centres = object_targets(scene_records())
    blue, red = OBJECT_COLORS.index("blue"), OBJECT_COLORS.index("red")
    assert counts[1, blue] == 3 and shapes[1, blue] == SHAPES.index("square") + 1
    assert counts[1].sum() == 3 and counts[0, red] == 1 and shapes[0, blue] == 0
    assert torch.allclose(centres[1, blue], torch.tensor([0.5, 0.4])) and torch.allclose(centres[0, red], torch.tensor([0.25, 0.5]))
    assert centres[0, blue].abs().sum() == 0


def test_text_pretraining_learns_the_probe_targets_and_resumes(tmp_path):
    from training.scenes import PALETTE
    from training.text_pretrain import pretrain_text

    tok = build_tiny_gemma_tokenizer()
    text = TextEncoder(build_tiny_gemma2(tok), tok, instruction="")
    before = [p.detach().clone() for p in text.model.parameters()]
    img = np.zeros((2, 64, 64, 3), np.uint8)
    img[0] = PALETTE["white"]
    img[0, 16:48, 0:32] = PALETTE["red"]
    img[1] = PALETTE["gray"]
    img[1, 8:24, 8:56] = PALETTE["blue"]
    _, losses, acc = pretrain_text(img, scene_records(), text, tmp_path, steps=100, batch=8, lr=3e-3,
                                   max_length=16, save_every=20)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert acc[0] > 0.9  # the two layouts are told apart from their captions
    assert acc[3] < 0.1  # and where each colour is
    assert any(not torch.equal(a, b) for a, b in zip(before, text.model.parameters()))
    assert not text.model.training
    _, more, _ = pretrain_text(img, scene_records(), text, tmp_path, steps=102, batch=8, lr=3e-3, max_length=16)
    assert len(more) == 2  # picked up at step 100


def test_dit_stage_with_frozen_text_leaves_the_text_encoder_alone(tmp_path):
    tok = build_tiny_gemma_tokenizer()
    text = TextEncoder(build_tiny_gemma2(tok), tok, instruction="")
    before = [p.detach().clone() for p in text.model.parameters()]
    torch.manual_seed(0)
    dit = TwigTransformer(TINY_TRANSFORMER)
    _, _, losses = train_dit(torch.randn(2, 32, 2, 2), scene_records(), text, dit, tmp_path, steps=40, batch=8,
                             lr=3e-3, max_length=16, train_text=False)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert all(torch.equal(a, b) for a, b in zip(before, text.model.parameters()))


def test_focus_draws_the_named_scenes_that_much_more_often(tmp_path, monkeypatch):
    import training.trainer as trainer

    records = scene_records() * 2  # red circle, blue squares, red circle, blue squares
    assert focus_weights(records, {"square": 3, "blue": 5}).tolist() == [1, 5, 1, 5]
    assert focus_weights(records, {"red": 0}).tolist() == [0, 1, 0, 1]
    with pytest.raises(TwigError, match="stars"):
        focus_weights(records, {"stars": 3})
    from argparse import ArgumentTypeError
    from training.__main__ import _focus
    assert _focus("star=2.5") == ("star", 2.5)
    for bad in ("star", "star=x", "=2", "star=-1"):
        with pytest.raises(ArgumentTypeError, match="NAME=FACTOR"):
            _focus(bad)
    drawn = []
    real = trainer.pick_captions
    monkeypatch.setattr(trainer, "pick_captions", lambda recs, idx, *a: drawn.extend(idx) or real(recs, idx, *a))
    tok = build_tiny_gemma_tokenizer()
    text = TextEncoder(build_tiny_gemma2(tok), tok, instruction="")
    weights = focus_weights(records, {"square": 3})
    train_dit(torch.randn(4, 32, 2, 2), records, text, TwigTransformer(TINY_TRANSFORMER), tmp_path, steps=6,
              batch=200, max_length=16, train_text=False, weights=weights)
    share = np.isin(drawn, [1, 3]).mean()  # 3 of every 4 draws, give or take sampling noise
    assert abs(share - 0.75) < 0.04, share
    with pytest.raises(TwigError, match="weights"):
        train_dit(torch.randn(4, 32, 2, 2), records, text, TwigTransformer(TINY_TRANSFORMER), tmp_path / "x",
                  steps=1, weights=[1, 1])


def test_downsample_is_an_area_mean():
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[0, :2, :2] = 200
    out = downsample_u8(img, 2)
    assert out.shape == (1, 2, 2, 3) and out[0, 0, 0, 0] == 200 and out[0, 1, 1, 0] == 0


def test_dit_warm_restart_resumed_at_the_cycle_end_matches_an_uninterrupted_run(tmp_path):
    from training.trainer import cycle_at

    def run(work, restarts):
        torch.manual_seed(0)
        tok = build_tiny_gemma_tokenizer()
        text = TextEncoder(build_tiny_gemma2(tok), tok, instruction="")
        dit = TwigTransformer(TINY_TRANSFORMER)
        train_dit(torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(1)), scene_records(), text, dit,
                  work, steps=12, batch=4, lr=3e-3, max_length=16, train_text=False, restarts=restarts)
        return [p.detach().clone() for p in dit.parameters()]

    whole = run(tmp_path / "a", [(8, 1e-3)])
    first_cycle = run(tmp_path / "b", [])
    resumed = run(tmp_path / "b", [(8, 1e-3)])
    assert all(torch.equal(x, y) for x, y in zip(whole, resumed))
    assert any(not torch.equal(x, y) for x, y in zip(first_cycle, resumed))  # the second cycle did train
    assert cycle_at(11, [(12, 3e-3), (8, 1e-3)]) == (0, 12, 3e-3)
    assert cycle_at(12, [(12, 3e-3), (8, 1e-3)]) == (12, 8, 1e-3)


def test_the_recipe_builds_its_vae_with_the_tuned_decoder_once_there_is_one(tmp_path):
    from training.__main__ import _vae
    from training.demo import DEMO_DCAE
    from training.trainer import Checkpoint

    torch.manual_seed(0)
    state = DCAE(DEMO_DCAE).state_dict()
    Checkpoint(tmp_path / "vae.ckpt").save(model=state, step=1)
    assert torch.equal(_vae(tmp_path).decoder.conv_in.weight, state["decoder.conv_in.weight"])
    tuned = {k: v + 1 if k.startswith("decoder.") else v for k, v in state.items()}
    Checkpoint(tmp_path / "decoder.ckpt").save(model=tuned, step=1)
    vae = _vae(tmp_path)
    assert torch.equal(vae.decoder.conv_in.weight, tuned["decoder.conv_in.weight"])
    assert torch.equal(vae.encoder.conv_in.weight, state["encoder.conv_in.weight"])


def test_a_kept_decoder_serves_a_larger_size_until_it_has_its_own(tmp_path):
    """--decoder-init: the 256² decoder kept in an exported folder (stored fp16) fills the 256² stages' DC-AE while
    DIR/size256 has no decoder.ckpt, not the 128² stages'; a DC-AE with another encoder is refused by name."""
    import argparse

    from training.__main__ import _vae
    from training.demo import DEMO_DCAE
    from training.export import export_vae
    from training.trainer import Checkpoint

    torch.manual_seed(0)
    work, kept = tmp_path / "work", tmp_path / "kept"
    base = DCAE(DEMO_DCAE)
    for p in base.parameters():  # what a seeded work folder holds: weights read from fp16 files
        p.data = p.data.half().float()
    work.mkdir()
    Checkpoint(work / "vae.ckpt").save(model=base.state_dict())
    tuned = DCAE(DEMO_DCAE)
    tuned.load_state_dict({k: v + 0.5 if k.startswith("decoder.") else v for k, v in base.state_dict().items()})
    export_vae(kept / "vae", tuned)
    a = argparse.Namespace(size=256, decoder_init=str(kept))
    got = _vae(work, a)
    assert all(torch.equal(v, tuned.state_dict()[k].half().float()) for k, v in got.state_dict().items())
    assert torch.equal(_vae(work).decoder.conv_in.weight, base.decoder.conv_in.weight)  # the 128² stages
    own = {k: v - 1 if k.startswith("decoder.") else v for k, v in base.state_dict().items()}
    (work / "size256").mkdir()
    Checkpoint(work / "size256" / "decoder.ckpt").save(model=own, step=1)
    assert torch.equal(_vae(work, a).decoder.conv_in.weight, own["decoder.conv_in.weight"])  # its own wins

    other = DCAE(DEMO_DCAE)  # another encoder: latents encoded here would not match its decoder
    export_vae(tmp_path / "other", other)
    with pytest.raises(SystemExit, match="other: its DC-AE's encoder is not this work folder's"):
        _vae(work, argparse.Namespace(size=512, decoder_init=str(tmp_path / "other")))
    with pytest.raises(SystemExit, match="--decoder-init .*nowhere: no DC-AE there"):
        _vae(work, argparse.Namespace(size=512, decoder_init=str(tmp_path / "nowhere")))


def test_lora_trains_only_the_adapters_and_merges_into_plain_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from training.lora import apply_lora, load_lora, lora_state_dict, lora_targets, merge_lora

    tok = build_tiny_gemma_tokenizer()
    text = TextEncoder(build_tiny_gemma2(tok), tok, instruction="")
    torch.manual_seed(0)
    dit = TwigTransformer(TINY_TRANSFORMER)
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    x = torch.randn(2, 32, 2, 2)
    emb, mask = torch.randn(2, 5, TINY_TRANSFORMER.caption_channels), torch.ones(2, 5, dtype=torch.bool)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        before = dit(x, t, emb, mask)
    targets = lora_targets(dit)
    assert any(n.endswith("attn.qkv") for n in targets) and any("cross_attn.kv_linear" in n for n in targets)
    assert not any(n.endswith("depth_conv.conv") for n in targets)  # depthwise 3x3 convolutions stay as they are
    params = apply_lora(dit, rank=4)
    assert len(params) == 2 * len(targets)
    with torch.no_grad():
        assert torch.equal(dit(x, t, emb, mask), before)  # adapters start as no change
    _, _, losses = train_dit(torch.randn(2, 32, 2, 2), scene_records(), text, dit, tmp_path, steps=40, batch=8,
                             lr=1e-2, max_length=16, train_text=False, params=params)
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    for name in targets:  # frozen weights untouched, adapters trained
        assert torch.equal(dit.get_submodule(name).parametrizations.weight.original, base[name + ".weight"])
    assert all(p.abs().sum() > 0 for p in params[1::2])
    with torch.no_grad():
        adapted = dit(x, t, emb, mask)
    assert not torch.allclose(adapted, before, atol=1e-4)

    save_file(lora_state_dict(dit), tmp_path / "lora.safetensors")
    again = TwigTransformer(TINY_TRANSFORMER)
    again.load_state_dict(base)
    load_lora(again, load_file(tmp_path / "lora.safetensors"))
    merge_lora(dit)
    assert set(dit.state_dict()) == set(base)  # plain weights under the original names
    fresh = TwigTransformer(TINY_TRANSFORMER)
    fresh.load_state_dict(dit.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x, t, emb, mask), adapted, atol=1e-5)
        assert torch.allclose(again(x, t, emb, mask), adapted, atol=1e-5)


def test_the_recipe_at_256_encodes_8x8_latents_beside_the_128_ones(tmp_path):
    from training.__main__ import _text_and_dit, main
    from training.demo import DEMO_DCAE
    from training.scenes import build_dataset
    from training.trainer import Checkpoint

    build_dataset(tmp_path / "data", n_train=3, n_heldout=1, size=256, supersample=1)
    torch.manual_seed(0)
    Checkpoint(tmp_path / "vae.ckpt").save(model=DCAE(DEMO_DCAE).state_dict(), step=1)
    for size in (128, 256):
        assert main(["demo", "--work", str(tmp_path), "--stage", "latents", "--size", str(size)]) == 0
    assert torch.load(tmp_path / "latents.pt", weights_only=True).shape == (3, 32, 4, 4)
    assert torch.load(tmp_path / "size256" / "latents.pt", weights_only=True).shape == (3, 32, 8, 8)
    tok = build_tiny_gemma_tokenizer()
    assert _text_and_dit(tmp_path, tok, True, 256)[1].config.sample_size == 8
    for stage in ("export", "eval"):  # the shipped 128² model is never overwritten by, nor scored as, a 256² one
        with pytest.raises(SystemExit, match="give --out"):
            main(["demo", "--work", str(tmp_path), "--stage", stage, "--size", "256"])


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A work folder seeded from the shipped demo model (the seed stage's default source)."""
    from training.__main__ import main
    from twig_core.catalog import DEMO_DIR, is_pipeline_folder

    if not is_pipeline_folder(str(DEMO_DIR)):
        pytest.skip("the demo model's weights are not in this checkout")
    work = tmp_path_factory.mktemp("seeded")
    assert main(["demo", "--work", str(work), "--stage", "seed"]) == 0
    return work


def _tensors(folder):
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(p).items()}


def test_a_seeded_work_folder_exports_the_pipeline_it_came_from(seeded, tmp_path):
    import json
    import shutil

    from training.__main__ import main
    from twig_core.catalog import DEMO_DIR

    work = tmp_path / "work"
    shutil.copytree(seeded, work)
    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    # the stages the seed replaces skip, and seeding again changes nothing
    assert main(["demo", "--work", str(work), "--stage", "seed", "vae", "decoder", "text"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == before
    assert main(["demo", "--work", str(work), "--stage", "export", "--out", str(tmp_path / "out")]) == 0
    shipped, again = _tensors(DEMO_DIR), _tensors(tmp_path / "out")
    assert len(shipped) > 200 and set(again) == set(shipped)
    assert all(torch.equal(again[k], v) for k, v in shipped.items())
    for cfg in ("transformer/config.json", "vae/config.json", "text_encoder/twig_text.json", "model_index.json",
                "tokenizer/tokenizer.json"):
        assert json.loads((tmp_path / "out" / cfg).read_text()) == json.loads((DEMO_DIR / cfg).read_text()), cfg
    trained = tmp_path / "trained"  # a folder with a recipe's own training is never overwritten
    trained.mkdir()
    (trained / "vae.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit, match="seed an empty work folder"):
        main(["demo", "--work", str(trained), "--stage", "seed"])


def test_the_256_dit_starts_from_every_128_weight_and_a_stopped_run_resumes(seeded, tmp_path, monkeypatch):
    import argparse
    import shutil

    import training.trainer
    from training.__main__ import _init_dit, _text_and_dit, _tokenizer, main
    from training.scenes import build_dataset

    work = tmp_path / "work"
    shutil.copytree(seeded, work)
    build_dataset(work / "data", n_train=4, n_heldout=1, size=256, supersample=1)
    init = torch.load(work / "dit_ema.pt", weights_only=True)["transformer"]
    # the 256² model reads a 4x4 latent exactly as the 128² one: its positions are the 4x4 grid's, interpolated
    tok = _tokenizer(work)
    small, large = _text_and_dit(work, tok, True, 128)[1], _text_and_dit(work, tok, True, 256)[1]
    small.load_state_dict(init)
    large.load_state_dict(init)
    x, emb, mask = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 192), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(small(x, torch.tensor([300.0, 800.0]), emb, mask),
                           large(x, torch.tensor([300.0, 800.0]), emb, mask))
        assert large(torch.randn(1, 32, 8, 8), torch.tensor([500.0]), emb[:1], mask[:1]).shape == (1, 32, 8, 8)

    run = ["demo", "--work", str(work), "--size", "256", "--mix-128", "--batch", "2", "--fp32", "--dit-restart",
           "none", "--dit-warmup", "1", "--save-minutes", "0"]
    assert main([*run, "--stage", "latents"]) == 0
    assert torch.load(work / "latents.pt", weights_only=True).shape == (4, 32, 4, 4)  # --mix-128's 128² batches
    # learning rate 0: the weights stay the 128² ones, so every tensor must have come from them
    assert main([*run, "--stage", "dit", "--dit-steps", "2", "--lr", "0"]) == 0
    out = torch.load(work / "size256" / "dit_ema.pt", weights_only=True)["transformer"]
    assert set(out) == set(init) and all(torch.equal(out[k], v) for k, v in init.items())

    calls = {"n": 0}
    descend = training.trainer.descend

    def stop_on_the_second(*args):  # the run is stopped during its second step (checkpoints every step)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return descend(*args)

    monkeypatch.setattr(training.trainer, "descend", stop_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        main([*run, "--stage", "dit", "--dit-steps", "5", "--lr", "1e-3"])
    monkeypatch.undo()
    assert torch.load(work / "size256" / "dit.ckpt", weights_only=True)["step"] == 3
    assert main([*run, "--stage", "dit", "--dit-steps", "5", "--lr", "1e-3"]) == 0
    log = (work / "size256" / "dit.log").read_text()
    assert "resumed dit at step 2" in log and "resumed dit at step 3" in log
    assert "dit step 4 " in log and "dit step 2 " not in log.split("resumed dit at step 3")[1]
    assert torch.load(work / "size256" / "dit.ckpt", weights_only=True)["step"] == 5
    out = torch.load(work / "size256" / "dit_ema.pt", weights_only=True)["transformer"]
    assert not all(torch.equal(out[k], v) for k, v in init.items())  # and it trained

    # weights kept between machines as an exported pipeline folder start a fresh run, rounded as stored (fp16)
    assert main([*run, "--stage", "export", "--out", str(tmp_path / "p256")]) == 0
    fresh = _text_and_dit(work, tok, True, 256)[1]
    _init_dit(tmp_path / "fresh", argparse.Namespace(size=256, dit_init=str(tmp_path / "p256")), fresh)
    got = fresh.state_dict()
    assert set(got) == set(out) and all(torch.equal(got[k], v.half().float()) for k, v in out.items())

    bad = tmp_path / "bad.pt"
    torch.save({"transformer": {k: v for k, v in list(init.items())[1:]}}, bad)
    a = argparse.Namespace(size=256, dit_init=str(bad))
    with pytest.raises(SystemExit, match="not this recipe's DiT weights"):
        _init_dit(tmp_path / "fresh", a, large)
    with pytest.raises(SystemExit, match="not this recipe's DiT weights"):  # a folder without a transformer
        _init_dit(tmp_path / "fresh", argparse.Namespace(size=256, dit_init=str(tmp_path / "p256" / "vae")), large)


def test_the_kept_256_weights_start_the_recipes_256_dit(tmp_path):
    """twig_core/demo_model_256, the 256² model as far as its training has come, is what a fresh work folder's
    ``--dit-init`` and ``--decoder-init`` read: every weight of the recipe's 256² DiT, which draws as exported, and
    its DC-AE, whose encoder is the shipped model's that a seeded folder holds."""
    import argparse

    from training.__main__ import _init_dit, _kept_decoder, _text_and_dit, _tokenizer, _vae_model
    from twig_core.catalog import DEMO_256_DIR, DEMO_DIR
    from twig_core.networks import load_transformer, load_vae

    kept = DEMO_256_DIR
    dit = _text_and_dit(kept, _tokenizer(kept), True, 256)[1]
    _init_dit(tmp_path, argparse.Namespace(size=256, dit_init=str(kept)), dit)
    ref = load_transformer(kept / "transformer", dtype=torch.float32)
    assert ref.config == dit.config  # the recipe's 256² DiT, 8x8 grid and interpolated positions
    x, emb, mask = torch.randn(1, 32, 8, 8), torch.randn(1, 6, ref.config.caption_channels), torch.ones(1, 6).bool()
    with torch.no_grad():
        assert torch.equal(dit(x, torch.tensor([400.0]), emb, mask), ref(x, torch.tensor([400.0]), emb, mask))
    # its DC-AE (--decoder-init) goes into a work folder seeded from the shipped model: the encoder is the same
    seeded = load_vae(DEMO_DIR, dtype=torch.float32, lazy_encoder=False)
    vae = _vae_model(seeded.config.scaling_factor)
    vae.load_state_dict(seeded.state_dict())
    _kept_decoder(vae, kept)
    want = load_vae(kept, dtype=torch.float32, lazy_encoder=False).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in vae.state_dict().items())


def test_the_256_recipe_runs_its_cycles_in_order_and_resumes_after_a_stop(seeded, tmp_path, monkeypatch, capfd):
    """``python -m training demo256`` (its steps shortened): the decoder tuned at 256², then each DiT cycle from
    the export of the one before, its files kept with that export; stopped in the second cycle and run again, the
    first is not trained again and the second goes on from its checkpoint; the last export is scored."""
    import json
    import shutil

    import training.recipe256 as recipe
    import training.trainer
    from training.__main__ import main
    from training.scenes import build_dataset

    work = tmp_path / "work"
    shutil.copytree(seeded, work)
    build_dataset(work / "data", n_train=4, n_heldout=2, size=256, supersample=1)
    monkeypatch.setattr(recipe, "PREPARE", ("--stage", "seed", "data", "latents", "decoder", "--decoder-steps", "1"))
    shape = json.loads((work / "data" / "train.json").read_text())[0]["scene"]["groups"][0]["shape"]
    monkeypatch.setattr(recipe, "CYCLES", ((3, 1e-3, ()), (3, 1e-3, ()), (2, 1e-3, (f"{shape}=3",))))
    run = ["demo256", "--work", str(work), "--batch", "2", "--save-minutes", "0", "--eval-n", "2"]
    calls = {"n": 0}
    descend = training.trainer.descend

    def stop_in_the_second_cycle(*args):
        calls["n"] += 1
        if calls["n"] == 1 + 3 + 2:  # after the decoder's step and the first cycle's 3: the second cycle's second
            raise KeyboardInterrupt
        return descend(*args)

    monkeypatch.setattr(training.trainer, "descend", stop_in_the_second_cycle)
    with pytest.raises(KeyboardInterrupt):
        main(run)
    monkeypatch.setattr(training.trainer, "descend", descend)
    first = (work / "cycle1" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert (work / "size256" / "decoder.ckpt").exists() and not (work / "cycle2" / "training").exists()
    capfd.readouterr()
    assert main(run) == 0
    said = capfd.readouterr().out
    assert first == (work / "cycle1" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert f"the DiT starts from {work / 'cycle2'}" in said and f"starts from {work / 'cycle1'}" not in said
    for i in (1, 2, 3):
        kept = work / f"cycle{i}" / "training"
        assert {p.name for p in kept.iterdir()} == set(recipe.DIT_FILES), i
        assert torch.load(kept / "dit.ckpt", weights_only=True)["step"] == recipe.CYCLES[i - 1][0]
    assert "resumed dit at step 1" in (work / "cycle2" / "training" / "dit.log").read_text()
    assert not (work / "size256" / "dit.ckpt").exists()
    summary = json.loads((work / "size256" / "eval.json").read_text())
    assert summary["n"] == 2 and "shape" in summary["en"]
