"""twig_core.text against diffusers' SanaPipeline.encode_prompt, with a tiny random Gemma-2."""

import inspect
import json

import pytest
import torch

from tests.builders import build_tiny_gemma2, build_tiny_gemma_tokenizer, save_tiny_gemma2_folder
from twig_core.errors import TwigError
from twig_core.text import COMPLEX_HUMAN_INSTRUCTION, Conditioning, TextEncoder, TokenReport, check_max_length

PROMPTS = [
    'A Cyberpunk cat with a neon sign that says "Sana"',
    "一只可爱的小猫在窗台上睡觉，阳光温暖。",
    "  (masterpiece) portrait of a young woman with red hair, freckles  ",
    "",
]
NEGATIVES = ["", "low quality, blurry, watermark", "模糊，低质量", ""]
LONG_PROMPT = " ".join(["a small fluffy white cat sleeping on a warm sunny windowsill, 红色的花,"] * 90)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_gemma_tokenizer()


@pytest.fixture(scope="module")
def gemma(tokenizer):
    return build_tiny_gemma2(tokenizer)


@pytest.fixture(scope="module")
def encoder(gemma, tokenizer):
    # diffusers lower-cases prompts; match it for the parity tests
    return TextEncoder(gemma, tokenizer, lowercase=True)


@pytest.fixture(scope="module")
def pipe(gemma, tokenizer):
    from diffusers import SanaPipeline

    # encode_prompt only needs the tokenizer and the text encoder
    return SanaPipeline(tokenizer=tokenizer, text_encoder=gemma, vae=None, transformer=None, scheduler=None)


def reference(pipe, prompts, negatives, max_length):
    with torch.no_grad():
        pos, pos_mask, neg, neg_mask = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
            device=torch.device("cpu"),
            max_sequence_length=max_length,
            complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION),
        )
    return pos, pos_mask, neg, neg_mask


def assert_close(ours: Conditioning, embeds, mask):
    """The same states at every kept position; zeros where the mask drops the padding (diffusers keeps Gemma's
    states of the pad tokens there, which the transformer never reads: test_padding_never_reaches_the_picture)."""
    assert ours.embeds.shape == embeds.shape
    assert torch.equal(ours.mask.long(), mask.long())
    kept = mask.bool()[..., None]
    err = (ours.embeds.float() - embeds.float()).masked_fill(~kept, 0).abs().max() / embeds.float().abs().max()
    assert err <= 1e-4, err
    assert not ours.embeds.masked_fill(kept, 0).any()


def test_instruction_is_sanas():
    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert list(COMPLEX_HUMAN_INSTRUCTION) == default


@pytest.mark.parametrize("max_length", [300, 600])
def test_matches_diffusers(encoder, pipe, max_length):
    pos, pos_mask, neg, neg_mask = reference(pipe, PROMPTS, NEGATIVES, max_length)
    ours_pos = encoder.encode(PROMPTS, max_length=max_length)
    ours_neg = encoder.encode(NEGATIVES, max_length=max_length, use_instruction=False)
    assert ours_pos.embeds.shape == (len(PROMPTS), max_length, 64)
    assert_close(ours_pos, pos, pos_mask)
    assert_close(ours_neg, neg, neg_mask)
    assert ours_pos.embeds.dtype == torch.float32 and ours_pos.mask.dtype == torch.long
    assert not ours_pos.warnings() and not ours_neg.warnings()


def test_padding_never_reaches_the_picture(encoder, pipe):
    """diffusers' transformer gives the same prediction from our conditioning (zeros at the padding) as from its
    own encode_prompt's (Gemma's pad states there), at full and at partial padding."""
    from tests.test_transformer import TINY, diffusers_model

    model = diffusers_model(TINY.replace(caption_channels=64))
    pos, pos_mask, neg, neg_mask = reference(pipe, PROMPTS, NEGATIVES, 300)
    ours_pos, ours_neg = encoder.encode(PROMPTS), encoder.encode(NEGATIVES, use_instruction=False)
    x, t = torch.randn(len(PROMPTS), 8, 4, 4), torch.tensor([900.0, 500.0, 100.0, 10.0])
    for theirs, mask, ours in ((pos, pos_mask, ours_pos), (neg, neg_mask, ours_neg)):
        assert (theirs.masked_fill(mask.bool()[..., None], 0).abs().amax((1, 2)) > 0).all()  # their pads differ
        with torch.no_grad():
            ref = model(x, encoder_hidden_states=theirs, encoder_attention_mask=mask, timestep=t).sample
            got = model(x, encoder_hidden_states=ours.embeds, encoder_attention_mask=ours.mask, timestep=t).sample
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_single_prompts_match_batch(encoder):
    batch = encoder.encode(PROMPTS, max_length=300)
    for i, p in enumerate(PROMPTS):
        one = encoder.encode(p, max_length=300)
        assert torch.equal(one.mask, batch.mask[i : i + 1])
        torch.testing.assert_close(one.embeds, batch.embeds[i : i + 1], rtol=1e-5, atol=1e-5)
        assert one.reports == batch.reports[i : i + 1]


def test_long_prompt_truncation_matches_diffusers(encoder, pipe):
    n = encoder.count_tokens(LONG_PROMPT)
    assert n > 1200
    for max_length in (300, 1200):
        pos, pos_mask, neg, neg_mask = reference(pipe, [LONG_PROMPT], [LONG_PROMPT], max_length)
        ours_pos = encoder.encode(LONG_PROMPT, max_length=max_length)
        ours_neg = encoder.encode(LONG_PROMPT, max_length=max_length, use_instruction=False)
        assert_close(ours_pos, pos, pos_mask)
        assert_close(ours_neg, neg, neg_mask)
        assert ours_pos.token_counts() == [max_length]  # nothing padded

        (rp,), (rn,) = ours_pos.reports, ours_neg.reports
        assert rp.prompt_tokens == n and rp.truncated
        # after <bos>: max_length - 1 positions, one of them the instruction's trailing "▁" unless merged
        assert rp.kept_tokens in (max_length - 2, max_length - 1)
        assert rp.kept_tokens + rp.dropped_tokens == n
        assert rp == encoder.token_report(LONG_PROMPT, max_length)
        assert ours_pos.warnings() == [f"prompt has {n} tokens, kept {rp.kept_tokens} ({n - rp.kept_tokens} dropped from the end)"]
        # negative path: <bos> + max_length - 1 prompt tokens, counted without the instruction
        assert rn.prompt_tokens == encoder.count_tokens(LONG_PROMPT, use_instruction=False)
        assert rn.kept_tokens == max_length - 1


def test_truncation_keeps_the_start_of_the_prompt(encoder, tokenizer):
    max_length = 300
    ids, mask, (report,) = encoder.tokenize(LONG_PROMPT, max_length)
    prompt_ids = tokenizer(encoder.instruction + LONG_PROMPT, add_special_tokens=False)["input_ids"]
    head = tokenizer(encoder.instruction, add_special_tokens=False)["input_ids"]
    start = next(i for i, (a, b) in enumerate(zip(head, prompt_ids)) if a != b)  # the prompt's first token
    kept = ids[0, -(max_length - 1) :].tolist()
    assert kept[-report.kept_tokens :] == prompt_ids[start : start + report.kept_tokens]
    assert ids[0, 0].item() == tokenizer.bos_token_id and bool(mask.all())


def test_short_prompt_report(encoder):
    report = encoder.token_report("a cat", 300)
    assert report == TokenReport(encoder.count_tokens("a cat"), encoder.count_tokens("a cat"))
    assert not report.truncated and report.warning() is None
    assert encoder.count_tokens("") == 0 and encoder.count_tokens("", use_instruction=False) == 0


def test_case_is_kept_by_default(gemma, tokenizer, encoder, pipe):
    keep_case = TextEncoder(gemma, tokenizer)
    assert not torch.equal(keep_case.tokenize("A Cat")[0], encoder.tokenize("A Cat")[0])
    pos, pos_mask, _, _ = reference(pipe, ["a cat"], [""], 300)
    assert_close(keep_case.encode("a cat"), pos, pos_mask)


def test_causal_lm_is_unwrapped(gemma, tokenizer, encoder):
    lm = build_tiny_gemma2(tokenizer, causal_lm=True)
    lm.model.load_state_dict(gemma.state_dict())
    enc = TextEncoder(lm, tokenizer, lowercase=True)
    assert enc.model is lm.model
    torch.testing.assert_close(enc.encode("a cat").embeds, encoder.encode("a cat").embeds)


@pytest.mark.parametrize("bad", [0, 1, 1201, 5000, -300, 300.5, "300", None, True])
def test_bad_max_length(encoder, bad):
    with pytest.raises(TwigError, match="max_length"):
        encoder.encode("a cat", max_length=bad)
    with pytest.raises(ValueError):
        check_max_length(bad)


def test_max_length_range_ends(encoder):
    assert check_max_length(2) == 2 and check_max_length(1200) == 1200
    assert encoder.encode("a cat", max_length=2).embeds.shape[1] == 2
    assert encoder.encode("a cat", max_length=1200).embeds.shape[1] == 1200


def test_non_string_prompt(encoder):
    with pytest.raises(TwigError, match="prompt"):
        encoder.encode(["a cat", 3])
    with pytest.raises(TwigError, match="prompt"):
        encoder.encode([])


def test_overflow_is_reported(gemma, tokenizer):
    import copy

    half = copy.deepcopy(gemma).half()
    with torch.no_grad():
        half.norm.weight.fill_(6e4)  # (1 + w) * x leaves the float16 range
    with pytest.raises(TwigError, match="float16"):
        TextEncoder(half, tokenizer).encode("a cat")


@pytest.mark.parametrize("causal_lm", [False, True])
def test_from_pretrained_round_trip(tmp_path, causal_lm):
    model, tok = save_tiny_gemma2_folder(tmp_path, causal_lm=causal_lm)
    expected = TextEncoder(model, tok).encode(PROMPTS[:2], max_length=300)
    loaded = TextEncoder.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert loaded.model.config._attn_implementation == "eager"
    assert type(loaded.model).__name__ == "Gemma2Model"
    got = loaded.encode(PROMPTS[:2], max_length=300)
    assert torch.equal(got.mask, expected.mask)
    torch.testing.assert_close(got.embeds, expected.embeds)

    bf16 = TextEncoder.from_pretrained(tmp_path, dtype=torch.bfloat16).encode("a cat")
    assert bf16.embeds.dtype == torch.bfloat16


def test_from_pretrained_diffusers_layout(tmp_path):
    model, tok = save_tiny_gemma2_folder(tmp_path / "text_encoder")
    tok.save_pretrained(tmp_path / "tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "text_encoder" / f).unlink()
    loaded = TextEncoder.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.encode("a cat").embeds, TextEncoder(model, tok).encode("a cat").embeds)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(TwigError, match="not found"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(TwigError, match="config.json"):
        TextEncoder.from_pretrained(tmp_path)
    save_tiny_gemma2_folder(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TwigError, match="gemma2"):
        TextEncoder.from_pretrained(tmp_path)
    cfg["model_type"] = "gemma2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.bin.moved")
    with pytest.raises(TwigError, match="weights"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "weights.bin.moved").rename(tmp_path / "model.safetensors")
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(TwigError, match="tokenizer"):
        TextEncoder.from_pretrained(tmp_path)


def test_conditioning_helpers():
    a = Conditioning(torch.randn(1, 4, 8), torch.tensor([[1, 1, 0, 0]]), (TokenReport(1, 1),))
    b = Conditioning(torch.randn(2, 6, 8, dtype=torch.float64), torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]))
    assert a.token_counts() == [2] and b.token_counts() == [3, 6]

    ab = Conditioning.cat([a, b])
    assert ab.embeds.shape == (3, 6, 8) and ab.embeds.dtype == torch.float32
    assert ab.token_counts() == [2, 3, 6]
    assert torch.equal(ab.embeds[0, 4:], torch.zeros(2, 8)) and ab.reports == ()
    aa = Conditioning.cat([a, a])
    assert aa.reports == (TokenReport(1, 1),) * 2

    r = b.repeat(2)
    assert r.batch_size == 4 and r.token_counts() == [3, 3, 6, 6]

    h = a.to("cpu", torch.float16)
    assert h.embeds.dtype == torch.float16 and h.mask.dtype == torch.long and h.reports == a.reports

    with pytest.raises(TwigError):
        Conditioning(torch.randn(1, 4, 8), torch.ones(1, 5))
    with pytest.raises(TwigError):
        Conditioning.cat([a, Conditioning(torch.randn(1, 4, 9), torch.ones(1, 4))])


def test_folder_settings_replace_the_instruction(tmp_path):
    from twig_core.loader import load_text_encoder

    save_tiny_gemma2_folder(tmp_path)
    default = TextEncoder.from_pretrained(tmp_path)
    assert default.instruction == "\n".join(COMPLEX_HUMAN_INSTRUCTION)
    (tmp_path / "twig_text.json").write_text(json.dumps({"instruction": []}))
    for enc in (TextEncoder.from_pretrained(tmp_path), load_text_encoder(tmp_path)):
        assert enc.instruction == ""
        with_instr = enc.encode(["a red circle"], max_length=20, use_instruction=True)
        without = enc.encode(["a red circle"], max_length=20, use_instruction=False)
        assert torch.equal(with_instr.embeds, without.embeds)
    (tmp_path / "twig_text.json").write_text(json.dumps({"instruction": "not a list"}))
    with pytest.raises(TwigError, match="twig_text.json"):
        TextEncoder.from_pretrained(tmp_path)
