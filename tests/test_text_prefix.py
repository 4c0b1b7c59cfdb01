"""TextEncoder.encode's instruction-prefix cache: the same conditioning as the full forward (ours and transformers'
Gemma2Model run directly on the whole sequence), the prefix run once, and made again whenever what produced it
changes. Tiny random Gemma-2 from tests/builders.py."""

import copy

import pytest
import torch

from tests.builders import build_tiny_gemma2, build_tiny_gemma_tokenizer
from tests.test_text import gemma, tokenizer  # noqa: F401  (the tiny Gemma-2 and its tokenizer, shared fixtures)
from twig_core.text import TextEncoder, _common_prefix

LONG = " ".join(["a small fluffy white cat sleeping on a warm sunny windowsill, 红色的花,"] * 20)
CASES = {
    "one": ["A Cyberpunk cat with a neon sign that says Sana"],
    "batch": ["a cat", "一只可爱的小猫在窗台上睡觉，阳光温暖。", "(masterpiece) portrait of a young woman, freckles", ""],
    "empty": [""],
    "chinese": ["一只可爱的小猫在窗台上睡觉"],
    "merging": ["cat sleeping"],
    "truncated": [LONG, "a dog"],
}


@pytest.fixture
def encoder(gemma, tokenizer):
    """A fresh encoder over its own copy of the model (tests change its weights), with its runs recorded."""
    enc = TextEncoder(copy.deepcopy(gemma), tokenizer)
    enc.runs = []  # input_ids lengths of every Gemma-2 forward
    enc.model.register_forward_pre_hook(lambda m, a, kw: enc.runs.append(kw["input_ids"].shape[1]), with_kwargs=True)
    return enc


def full(encoder, prompts, max_length=300, use_instruction=True):
    """The conditioning from the whole sequence (the gradient path, which never uses the cache)."""
    with torch.no_grad():
        return encoder.forward(prompts, max_length, use_instruction)


def assert_same(a, b, tol=1e-5):
    """Equal at the kept positions; ``a`` (from encode) holds zeros at the padding, where the whole forward ``b``
    holds Gemma's states of the pad tokens."""
    assert a.embeds.shape == b.embeds.shape
    assert torch.equal(a.mask, b.mask)
    assert a.reports == b.reports
    kept = b.mask.bool()[..., None]
    err = (a.embeds.double() - b.embeds.double()).masked_fill(~kept, 0).abs().max() / b.embeds.double().abs().max()
    assert err <= tol, err
    assert not a.embeds.masked_fill(kept, 0).any()


def total_length(encoder, max_length=300):
    return encoder._total_length(max_length, True)


def kept_length(encoder, prompts, max_length=300):
    """How far Gemma runs for a batch: to its longest prompt's last token."""
    return int(encoder.tokenize(prompts, max_length)[1].sum(1).max())


@pytest.mark.parametrize("case", CASES)
def test_cached_encode_equals_the_full_forward(encoder, case):
    prompts = CASES[case]
    got = encoder.encode(prompts, 40 if case == "truncated" else 300)
    n = len(encoder._prefix_ids())
    total = kept_length(encoder, prompts, 40 if case == "truncated" else 300)
    assert encoder.runs == [n, total - n]  # the prefix alone, then the rest up to the longest row
    assert_same(got, full(encoder, prompts, 40 if case == "truncated" else 300))
    if case == "truncated":
        assert got.reports[0].truncated


def test_a_merging_first_token_is_outside_the_prefix(encoder, tokenizer):
    def ids(text):
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    instruction = ids(encoder.instruction)
    merged = ids(encoder.instruction + CASES["merging"][0])
    assert _common_prefix(instruction, merged) < len(instruction)  # the prompt's first token took the last one
    prefix = encoder._prefix_ids()
    assert tuple(merged[:len(prefix)]) == prefix


def test_a_row_not_starting_with_the_prefix_runs_whole(encoder, tokenizer, monkeypatch):
    # pretend the whole instruction were the prefix: a prompt that absorbs its last token then does not start with it
    whole = tuple(tokenizer(encoder.instruction, add_special_tokens=True)["input_ids"])
    monkeypatch.setattr(encoder, "_prefix_ids", lambda: whole)
    got = encoder.encode(["cat sleeping", "a dog"])
    assert encoder.runs == [kept_length(encoder, ["cat sleeping", "a dog"])] and encoder._prefix is None
    assert_same(got, full(encoder, ["cat sleeping", "a dog"]))


def test_matches_transformers_gemma2_on_the_whole_sequence(encoder, gemma):
    prompts = CASES["batch"]
    got = encoder.encode(prompts, 300)
    ids, mask, _ = encoder.tokenize(prompts, 300)
    with torch.no_grad():
        hidden = gemma(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = [0, *range(ids.shape[1] - 299, ids.shape[1])]
    assert torch.equal(got.mask, mask[:, keep])
    err = (got.embeds - hidden[:, keep]).masked_fill(~mask[:, keep].bool()[..., None], 0).abs().max()
    assert err / hidden[:, keep].abs().max() <= 1e-5, err


def test_second_call_reuses_the_prefix(encoder):
    encoder.encode(["a cat"])
    n, first = len(encoder._prefix_ids()), encoder._prefix
    got = encoder.encode(["a dog on a hill", "一只猫"])
    lengths = [kept_length(encoder, p) - n for p in (["a cat"], ["a dog on a hill", "一只猫"])]
    assert encoder.runs == [n, *lengths] and encoder._prefix is first
    assert_same(got, full(encoder, ["a dog on a hill", "一只猫"]))


def test_weights_made_under_inference_mode(gemma, tokenizer):
    """ComfyUI loads and runs under torch.inference_mode: its weights are inference tensors, which keep no
    version counter; the prefix is still made once and reused, and matches the full forward."""
    with torch.inference_mode():
        enc = TextEncoder(copy.deepcopy(gemma), tokenizer)
        for p in enc.model.parameters():
            p.data = p.data.clone()  # an inference tensor, as a load inside inference_mode makes
        assert next(enc.model.parameters()).is_inference()
        enc.encode(["a cat"])
        first = enc._prefix
        got = enc.encode(["a dog on a hill", "一只猫"])
        assert enc._prefix is first
    assert_same(got, full(enc, ["a dog on a hill", "一只猫"]))


def test_no_instruction_and_forward_use_no_cache(encoder):
    got = encoder.encode(["a cat", ""], 300, use_instruction=False)
    assert encoder.runs == [int(encoder.tokenize(["a cat"], 300, False)[1].sum())] and encoder._prefix is None
    assert_same(got, full(encoder, ["a cat", ""], 300, use_instruction=False))
    encoder.runs.clear()
    empty = encoder.encode(["", ""], 300, use_instruction=False)
    assert encoder.runs == [1]  # the empty negative: <bos> alone
    assert_same(empty, full(encoder, ["", ""], 300, False))
    encoder.forward(["a cat"]).embeds.sum().backward()  # training: the whole sequence, with gradients
    assert encoder._prefix is None and encoder.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_sliding_window_reached_runs_whole(gemma, tokenizer):
    narrow = TextEncoder(build_tiny_gemma2(tokenizer, sliding_window=64), tokenizer)
    got = narrow.encode(["a cat", "a dog"])
    assert narrow._prefix is None  # the sequence reaches the window: the full forward's mask applies it
    assert_same(got, full(narrow, ["a cat", "a dog"]))
    wide = TextEncoder(build_tiny_gemma2(tokenizer, sliding_window=total_length(narrow) + 1), tokenizer)
    assert_same(wide.encode(["a cat", "a dog"]), full(wide, ["a cat", "a dog"]))
    assert wide._prefix is not None


# -- invalidation: each change below must make the prefix again, and give the changed model's states


def rebuilt_and_right(encoder, prompts=("a cat", "一只猫"), tol=1e-5):
    """Encode after a change: assert the prefix ran again and the result is the changed model's full forward."""
    encoder.runs.clear()
    got = encoder.encode(list(prompts))
    assert encoder.runs[0] == len(encoder._prefix_ids()), encoder.runs
    assert_same(got, full(encoder, list(prompts)), tol)
    return got


def test_weights_changed_in_place(encoder):
    before = encoder.encode(["a cat", "一只猫"])
    with torch.no_grad():
        encoder.model.layers[0].self_attn.k_proj.weight.add_(0.05)  # a merged patch, an optimizer step
    after = rebuilt_and_right(encoder)
    assert not torch.allclose(before.embeds, after.embeds)


def test_weight_replaced(encoder):
    encoder.encode(["a cat"])
    v = encoder.model.layers[1].self_attn.v_proj
    v.weight = torch.nn.Parameter(v.weight.detach() * 1.5)  # how a host's patcher sets a patched weight
    rebuilt_and_right(encoder)


def test_moved_or_cast(encoder):
    encoder.encode(["a cat"])
    encoder.model.to(torch.float64)  # behind the encoder's back: the weights' dtype is in the key
    rebuilt_and_right(encoder, tol=1e-12)
    encoder.to(dtype=torch.float32)
    assert encoder._prefix is None
    rebuilt_and_right(encoder)


def test_train_mode(encoder):
    encoder.encode(["a cat"])
    encoder.model.train()
    rebuilt_and_right(encoder)


def test_instruction_or_tokenizer_changed(encoder):
    encoder.encode(["a cat"])
    encoder.instruction = "Describe the picture in detail, colours and light included. User Prompt: "
    rebuilt_and_right(encoder)
    encoder.tokenizer = build_tiny_gemma_tokenizer(vocab_size=500)
    rebuilt_and_right(encoder)


def test_forget_prefix(encoder):
    encoder.encode(["a cat"])
    encoder.forget_prefix()
    rebuilt_and_right(encoder)


class Doubled(torch.nn.Linear):
    """A layer class a host might swap in: the same weights, another computation."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_layer_class_swapped_and_back(encoder):
    before = encoder.encode(["a cat", "一只猫"])
    layer = encoder.model.layers[0].mlp.down_proj
    layer.__class__ = Doubled
    swapped = rebuilt_and_right(encoder)
    assert not torch.equal(swapped.embeds, before.embeds)
    layer.__class__ = torch.nn.Linear
    assert torch.equal(rebuilt_and_right(encoder).embeds, before.embeds)
