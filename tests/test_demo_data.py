"""Demo dataset: scene generator/renderer, captions, tokenizer and the programmatic evaluator."""

import json
import math
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from twig_core.errors import TwigError
from training import evaluate as ev
from training import scenes as sc
from training import tokenizer as tk

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def kind_scenes():
    """Six scenes of every kind (42), deterministic."""
    out = []
    for i, kind in enumerate(list(sc.SCENE_KINDS) * 6):
        out.append(sc.sample_scene(sc.scene_rng(123, i), kind=kind))
    return out


@pytest.fixture(scope="module")
def renders(kind_scenes):
    return [sc.render_scene(s, 128) for s in kind_scenes]


@pytest.fixture(scope="module")
def tokenizer():
    return tk.train_tokenizer(sc.demo_tokenizer_corpus(400, seed=0))


# ----------------------------------------------------------------------------------------------------------------
# Scenes, rendering, dataset
# ----------------------------------------------------------------------------------------------------------------


def test_records_and_pixels_are_deterministic():
    a_train, a_held = sc.generate_records(20, 5, seed=7)
    b_train, b_held = sc.generate_records(20, 5, seed=7)
    assert json.dumps(a_train + a_held, ensure_ascii=False) == json.dumps(b_train + b_held, ensure_ascii=False)
    assert np.array_equal(sc.render_records(a_train), sc.render_records(b_train))
    c_train, _ = sc.generate_records(20, 5, seed=8)
    assert [r["scene"] for r in c_train] != [r["scene"] for r in a_train]


def test_build_dataset_is_deterministic(tmp_path):
    m1 = sc.build_dataset(tmp_path / "a", n_train=12, n_heldout=4, seed=1, size=64)
    m2 = sc.build_dataset(tmp_path / "b", n_train=12, n_heldout=4, seed=1, size=64)
    assert m1 == m2 and m1["n_train"] == 12 and m1["n_heldout"] == 4
    for split, n in (("train", 12), ("heldout", 4)):
        ia, ra = sc.load_split(tmp_path / "a", split)
        ib, rb = sc.load_split(tmp_path / "b", split)
        assert ia.shape == (n, 64, 64, 3) and ia.dtype == np.uint8
        assert np.array_equal(ia, ib) and ra == rb
        # the stored pixels are the renders of the stored scenes
        assert np.array_equal(ia[0], sc.render_scene(sc.Scene.from_dict(ra[0]["scene"]), 64))
    with pytest.raises(TwigError):
        sc.load_split(tmp_path / "a", "test")


def test_heldout_compositions_unseen_in_train():
    train, held = sc.generate_records(300, 30, seed=0)
    train_keys = {r["key"] for r in train}
    held_keys = [r["key"] for r in held]
    assert len(set(held_keys)) == len(held_keys)
    assert not train_keys & set(held_keys)
    train_caps = set(sc.all_caption_texts(train))
    assert not train_caps & set(sc.all_caption_texts(held))
    assert all(r["split"] == "heldout" for r in held) and all(r["split"] == "train" for r in train)


def test_scene_json_roundtrip_and_validation(kind_scenes):
    for s in kind_scenes:
        s2 = sc.Scene.from_json(s.to_json())
        assert s2 == s
        assert np.array_equal(sc.render_scene(s2, 64), sc.render_scene(s, 64))
        json.dumps(s.to_dict())  # JSON-serialisable
    bad = kind_scenes[0].copy()
    bad.background.colors = [bad.groups[0].color]
    with pytest.raises(TwigError):
        bad.validate()


def test_scene_rules(kind_scenes):
    assert {s.kind for s in kind_scenes} == set(sc.SCENE_KINDS)
    for s in kind_scenes:
        colors = [g.color for g in s.groups]
        assert len(set(colors)) == len(colors)
        assert not set(colors) & set(s.background.colors)
        assert 1 <= s.num_objects <= 4
        insts = [i for g in s.groups for i in g.instances]
        for a in range(len(insts)):
            i = insts[a]
            assert sc.BORDER_MARGIN - 1e-6 <= i.cx - i.r and i.cx + i.r <= 1 - sc.BORDER_MARGIN + 1e-6
            for b in range(a):
                j = insts[b]
                assert np.hypot(i.cx - j.cx, i.cy - j.cy) >= i.r + j.r  # no overlap


def test_render_sizes_and_antialiasing(kind_scenes):
    s = kind_scenes[0]
    a128, a256 = sc.render_scene(s, 128), sc.render_scene(s, 256)
    assert a128.shape == (128, 128, 3) and a256.shape == (256, 256, 3) and a128.dtype == np.uint8
    # antialiased edges: some pixels are neither background nor object colour
    pal = np.array(list(sc.PALETTE.values()))
    d = np.abs(a128[:, :, None, :].astype(int) - pal[None, None]).sum(-1).min(-1)
    assert (d > 30).any()


def test_captions_in_both_languages():
    train, held = sc.generate_records(60, 6, seed=2)
    for r in train + held:
        styles = [c["style"] for c in r["captions"]]
        assert set(styles) == set(sc.CAPTION_STYLES)
        for c in r["captions"]:
            assert c["en"] and c["en"].isascii() and not CJK.search(c["en"])
            assert CJK.search(c["zh"]) and not re.search(r"[A-Za-z]", c["zh"])
            assert "二个" not in c["zh"] and "二颗" not in c["zh"]  # 两 before measure words
            if c["style"] == "long":
                assert c["en"].count(".") >= 2 and c["zh"].count("。") >= 2
        scene = sc.Scene.from_dict(r["scene"])
        for g in scene.groups:
            long_en = [c["en"] for c in r["captions"] if c["style"] == "long"][0]
            assert g.color in long_en
            assert sc._COLOR_ZH[g.color] in [c["zh"] for c in r["captions"] if c["style"] == "long"][0]


_REL_WORDS_EN = {w: rel for rel, w in sc._REL_EN.items()}
_REL_WORDS_ZH = {w: rel for rel, ws in sc._REL_ZH.items() for w in ws}


def _stated_relation(text, rel_words, colors, sep):
    """(order, (first colour, relation, second colour) as the sentence means it) of the one sentence of
    ``text`` that states the relation: order "subject" when a colour comes before the relation words,
    "relation" when both come after them (en) or one does (zh: "B的左边有A")."""
    [sentence] = [x for x in text.split(sep) if any(w in x.lower() for w in rel_words)]
    low = sentence.lower()
    word = max((w for w in rel_words if w in low), key=len)
    at = low.index(word)
    found = sorted((low.index(c), c) for c in colors)
    before = [c for i, c in found if i < at]
    after = [c for i, c in found if i > at]
    rel = rel_words[word]
    if sep == ". ":
        if before:  # "A to the left of B"
            return "subject", (before[0], rel, after[0])
        return "relation", (after[1], rel, after[0])  # "to the left of B, A"
    if after:  # "B的左边有A" / "在B的左边，有A"
        return "relation", (after[0], rel, before[0])
    return "subject", (before[0], rel, before[1])  # "A在B左边"


def test_relation_captions_both_orders_same_in_both_languages():
    """A relation is stated subject first or relation first, the same order in the English caption and its
    Chinese translation, and each way round means the scene's actual relation."""
    scene = sc.Scene("pair_relation", [sc.Group("circle", "red", 2, "small"), sc.Group("triangle", "cyan", 1, "large")],
                     sc.Background(["white"]), relation=sc.Relation(0, "left_of", 1))
    true = {("red", "left_of", "cyan"), ("cyan", "right_of", "red")}
    zh_colors = {"红色": "red", "青色": "cyan"}
    orders = set()
    for seed in range(40):
        for c in sc.make_captions(scene, np.random.default_rng(seed), styles=["short", "medium", "long"]):
            o_en, m_en = _stated_relation(c["en"], _REL_WORDS_EN, ["red", "cyan"], ". ")
            o_zh, m_zh = _stated_relation(c["zh"], _REL_WORDS_ZH, list(zh_colors), "。")
            m_zh = (zh_colors[m_zh[0]], m_zh[1], zh_colors[m_zh[2]])
            assert o_en == o_zh, c
            assert sc.stated_order(c["en"]) == o_en, c  # what the evaluator splits position accuracy by
            assert m_en in true and m_zh in true, c
            orders.add((c["style"], o_en))
    assert orders == {(st, o) for st in sc.CAPTION_STYLES for o in ("subject", "relation")}


def test_relation_order_split_of_position_accuracy():
    plain = sc.Scene("pair_position", [sc.Group("circle", "red", 1, "large", "left")], sc.Background(["white"]))
    assert all(sc.stated_order(c["en"]) is None for c in sc.make_captions(plain, np.random.default_rng(0)))
    res = lambda pos: {"position": pos}  # noqa: E731
    split = ev.by_order(["subject", "relation", "relation", None, "subject"],
                        [res(True), res(True), res(False), res(True), res(None)],
                        [res(False), res(True), res(True), res(False), res(None)])
    assert split == {"subject": {"n": 1, "en": 1.0, "zh": 0.0}, "relation": {"n": 2, "en": 0.5, "zh": 1.0}}


def test_caption_examples():
    scene = sc.Scene("pair_position",
                     [sc.Group("circle", "red", 1, "large", "left"), sc.Group("square", "blue", 1, "small", "right")],
                     sc.Background(["white"]))
    caps = sc.make_captions(scene, np.random.default_rng(0), styles=["short"] * 6 + ["medium", "long"])
    en = {c["en"] for c in caps}
    zh = {c["zh"] for c in caps}
    assert any(e.startswith("a red circle on the left") and "a blue square on the right" in e for e in en)
    assert any(z.startswith("左边一个红色的圆") or z.startswith("左侧一个红色的圆") or "左边有一个红色的圆" in z for z in zh)
    medium = caps[-2]
    assert "white background" in medium["en"] and "large red circle" in medium["en"]
    assert "白色" in medium["zh"] and "红色的大圆" in medium["zh"]
    count = sc.Scene("count", [sc.Group("star", "yellow", 3, "small")], sc.Background(["black"]))
    c = sc.make_captions(count, np.random.default_rng(1), styles=["short"])[0]
    assert c["en"] == "three yellow stars"
    assert c["zh"] in ("三颗黄色的星星", "三个黄色的五角星", "画面中有三颗黄色的星星", "画面中有三个黄色的五角星")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------

TEXTS = [
    "a red circle on the left and a blue square on the right",
    "白色背景上，一个绿色的星星在黄色三角形的上方",
    "A zebra café 🦓, drawn in 3 colors!",  # unseen words, accents, emoji
    "一只熊猫在吃竹子",  # unseen Chinese characters -> byte tokens
    "three red circles 三个红色的圆",
]


def test_tokenizer_roundtrip_and_byte_fallback(tokenizer):
    assert 300 < len(tokenizer) <= 2000
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3)
    for t in TEXTS:
        ids = tokenizer.encode(t)
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == t
    toks = tokenizer.convert_ids_to_tokens(tokenizer.encode(TEXTS[3]))
    assert any(x.startswith("<0x") for x in toks)  # 熊猫 are not in the caption vocabulary
    # caption words are whole tokens, Chinese is per character
    assert tokenizer.tokenize("a red circle") == ["▁a", "▁red", "▁circle"]
    assert tokenizer.tokenize("红色的圆")[1:] == ["红", "色", "的", "圆"]


def test_tokenizer_call_interface(tokenizer):
    assert tokenizer.padding_side == "right"
    b = tokenizer(TEXTS, padding="max_length", max_length=24, truncation=True, add_special_tokens=True,
                  return_tensors="pt")
    ids, mask = b["input_ids"], b["attention_mask"]
    assert tuple(ids.shape) == (len(TEXTS), 24) and tuple(mask.shape) == (len(TEXTS), 24)
    n0 = len(tokenizer.encode(TEXTS[0]))
    assert int(mask[0].sum()) == n0 and (ids[0, n0:] == tokenizer.pad_token_id).all()
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    tokenizer.padding_side = "left"
    b2 = tokenizer(TEXTS[:1], padding="max_length", max_length=24, return_tensors="pt")
    tokenizer.padding_side = "right"
    assert b2["attention_mask"][0, -1] == 1 and b2["attention_mask"][0, 0] == 0


def test_tokenizer_save_and_autotokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tk.save_tokenizer(tokenizer, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for t in TEXTS:
        assert loaded.encode(t) == tokenizer.encode(t)
    a = loaded(TEXTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    b = tokenizer(TEXTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert (a["input_ids"] == b["input_ids"]).all() and (a["attention_mask"] == b["attention_mask"]).all()
    assert loaded.padding_side == "right"
    assert tk.load_tokenizer(tmp_path / "tok").encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])
    assert tk.load_tokenizer(tmp_path / "tok" / "tokenizer.json").encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])


def test_tokenizer_training_is_deterministic():
    corpus = sc.demo_tokenizer_corpus(100, seed=0)
    assert tk.train_backend(corpus).to_str() == tk.train_backend(corpus).to_str()


# ----------------------------------------------------------------------------------------------------------------
# Evaluator
# ----------------------------------------------------------------------------------------------------------------


def _assert_all_pass(results):
    agg = ev.aggregate(results)
    for cat, v in agg.items():
        if v["n"]:
            assert v["accuracy"] == 1.0, (cat, [r["details"] for r in results if r[cat] is False][:3])


def test_evaluator_ground_truth_scores_perfect(kind_scenes, renders):
    results = [ev.evaluate_image(s, im) for s, im in zip(kind_scenes, renders)]
    _assert_all_pass(results)
    agg = ev.aggregate(results)
    assert agg["position"]["n"] >= 18 and agg["background"]["n"] == len(kind_scenes)
    # also from PIL, from a torch tensor in [-1,1], and at 256x256
    import torch

    s, im = kind_scenes[3], renders[3]
    assert ev.evaluate_image(s, Image.fromarray(im))["overall"]
    t = torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1
    assert ev.evaluate_image(s, t)["overall"]
    _assert_all_pass([ev.evaluate_image(s, sc.render_scene(s, 256)) for s in kind_scenes[:12]])


def test_evaluator_tolerates_blur_and_noise(kind_scenes, renders):
    rng = np.random.default_rng(0)
    results = []
    for s, im in zip(kind_scenes, renders):
        x = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        x = x * 0.95 + 6 + rng.normal(0, 8, x.shape)  # blur, slight colour drift, noise
        results.append(ev.evaluate_image(s, np.clip(x, 0, 255).astype(np.uint8)))
    agg = ev.aggregate(results)
    for cat in ("color", "count", "count13", "position", "background"):
        assert agg[cat]["accuracy"] == 1.0, cat
    assert 0 < agg["count13"]["n"] < agg["count"]["n"]  # the fixtures include scenes of four
    assert agg["shape"]["accuracy"] >= 0.95


def _unused_color(scene):
    used = {g.color for g in scene.groups} | set(scene.background.colors)
    return next(c for c in sc.OBJECT_COLORS if c not in used)


def test_evaluator_fails_wrong_colors(kind_scenes):
    for s in kind_scenes:
        w = s.copy()
        w.groups[0].color = _unused_color(s)
        r = ev.evaluate_image(s, sc.render_scene(w, 128))
        assert r["color"] is False and r["overall"] is False


def test_evaluator_fails_swapped_colors(kind_scenes):
    n = 0
    for s in kind_scenes:
        if len(s.groups) < 2 or s.groups[0].shape == s.groups[1].shape:
            continue
        w = s.copy()
        w.groups[0].color, w.groups[1].color = s.groups[1].color, s.groups[0].color
        r = ev.evaluate_image(s, sc.render_scene(w, 128))
        assert r["overall"] is False
        n += 1
    assert n >= 10


def test_evaluator_fails_mirrored_positions(kind_scenes, renders):
    n = 0
    for s, im in zip(kind_scenes, renders):
        stated = [g.position for g in s.groups if g.position] + ([s.relation.relation] if s.relation else [])
        if not stated or all(p == "center" for p in stated):
            continue
        horizontal = any(("left" in p or "right" in p) for p in stated)
        flipped = im[:, ::-1] if horizontal else im[::-1]
        r = ev.evaluate_image(s, np.ascontiguousarray(flipped), check_background=False)
        assert r["position"] is False, (s.key(), r["details"])
        n += 1
    assert n >= 20


def test_evaluator_fails_wrong_counts(kind_scenes):
    rng = np.random.default_rng(5)
    n = 0
    for s in kind_scenes:
        for gi, g in enumerate(s.groups):
            if g.position or (s.relation and gi in (s.relation.subject, s.relation.object)):
                continue
            w = s.copy()
            wg = w.groups[gi]
            if g.count >= 2 and (g.count == 4 or rng.random() < 0.5):
                wg.instances = wg.instances[:-1]  # one fewer
                wg.count -= 1
            else:
                wg.count += 1  # one more, re-laid out
                sc.layout_scene(w, rng)
            r = ev.evaluate_image(s, sc.render_scene(w, 128))
            assert r["count"] is False and r["color"] is True, (s.key(), r["details"])
            # the 1-3 count category applies only to scenes asking for at most three of each colour
            assert r["count13"] is (False if max(x.count for x in s.groups) <= 3 else None), s.key()
            n += 1
            break
    assert n >= 12


def test_evaluator_fails_wrong_background(kind_scenes):
    for s in kind_scenes:
        w = s.copy()
        w.background.colors[0] = _unused_color(s)
        r = ev.evaluate_image(s, sc.render_scene(w, 128))
        assert r["background"] is False and r["color"] is True
        assert ev.evaluate_image(s, sc.render_scene(w, 128), check_background=False)["background"] is None


def test_evaluator_fails_wrong_shapes(kind_scenes):
    for i, s in enumerate(kind_scenes):
        w = s.copy()
        w.groups[0].shape = sc.SHAPES[(sc.SHAPES.index(s.groups[0].shape) + 1 + i % 6) % len(sc.SHAPES)]
        r = ev.evaluate_image(s, sc.render_scene(w, 128))
        assert r["shape"] is False and r["color"] is True, (s.groups[0].shape, w.groups[0].shape, r["details"])


def _single(shape, color, cx, cy, r, bg="white"):
    return sc.Scene("single", [sc.Group(shape, color, instances=[sc.Instance(cx, cy, r)])], sc.Background([bg]))


def test_shape_classifier_names_every_shape_it_is_shown():
    """Each scene shape, drawn alone at the three sizes and several places, sharp and blurred: the classifier
    names it; drawn as any other shape, it names that other shape, not the one the scene asks for."""
    scenes, pictures, wrong = [], [], []
    rng = np.random.default_rng(3)
    for shape in sc.SHAPES:
        for size, r in sc.SIZES.items():
            for blur in (0.0, 0.8):
                s = _single(shape, "red", *rng.uniform(0.3, 0.7, 2), r)
                im = Image.fromarray(sc.render_scene(s, 128)).filter(ImageFilter.GaussianBlur(blur))
                scenes.append(s)
                pictures.append(np.asarray(im))
                other = s.copy()
                other.groups[0].shape = sc.SHAPES[(sc.SHAPES.index(shape) + 1 + len(wrong) % 6) % len(sc.SHAPES)]
                wrong.append(sc.render_scene(other, 128))
    chk = ev.check_shape_classifier(scenes, pictures)
    assert chk["accuracy"] == 1.0 and chk["n"] == len(scenes), chk["confusion"]
    assert set(chk["by_shape"]) == set(sc.SHAPES)
    bad = ev.check_shape_classifier(scenes, wrong)
    assert bad["accuracy"] == 0.0 and sum(bad["confusion"].values()) == len(scenes)
    # an object that is not drawn at all counts as wrong
    missing = ev.check_shape_classifier(scenes[:2], [np.full((128, 128, 3), 245, np.uint8)] * 2)
    assert missing["accuracy"] == 0.0 and set(missing["confusion"]) == {(sc.SHAPES[0], "none")}


def test_shape_classifier_on_the_data_stage_pictures():
    """The held-out pictures as the data stage makes them (256², supersampled, area-averaged to 128²)."""
    from training.trainer import downsample_u8

    _, held = sc.generate_records(0, 60, seed=0)
    pictures = downsample_u8(np.stack([sc.render_scene(sc.Scene.from_dict(r["scene"]), 256, 3) for r in held]), 128)
    chk = ev.check_shape_classifier([r["scene"] for r in held], pictures)
    assert chk["accuracy"] >= 0.98 and chk["n"] > len(held), chk


def test_attribution_fails_swapped_colours(kind_scenes):
    n = 0
    for s in kind_scenes:
        if len({g.shape for g in s.groups}) < 2:
            assert ev.evaluate_image(s, sc.render_scene(s, 128))["attribution"] is None
            continue
        assert ev.evaluate_image(s, sc.render_scene(s, 128))["attribution"] is True
        a, b = next((i, j) for i in range(len(s.groups)) for j in range(i + 1, len(s.groups))
                    if s.groups[i].shape != s.groups[j].shape)
        w = s.copy()
        w.groups[a].color, w.groups[b].color = s.groups[b].color, s.groups[a].color
        r = ev.evaluate_image(s, sc.render_scene(w, 128))
        assert r["attribution"] is False and r["color"] is True, (s.key(), r["details"])
        n += 1
    assert n >= 10


def test_two_objects_fail_when_merged_or_missing(kind_scenes):
    n = 0
    for s in kind_scenes:
        r = ev.evaluate_image(s, sc.render_scene(s, 128))
        if not (len(s.groups) == 2 and s.num_objects == 2):
            assert r["two_object"] is None
            continue
        assert r["two_object"] is True
        a, b = s.groups[0].instances[0], s.groups[1].instances[0]
        d = math.hypot(b.cx - a.cx, b.cy - a.cy)
        # the second object moved onto the first (half the sum of the radii, inside every shape's inner
        # radius), then two circles in their place moved to touch (centres the sum of the radii apart)
        for reach, circles in ((0.5, False), (1.0, True)):
            w = s.copy()
            k = reach * (a.r + b.r) / d
            w.groups[1].instances[0] = sc.Instance(a.cx + (b.cx - a.cx) * k, a.cy + (b.cy - a.cy) * k, b.r)
            if circles:
                w.groups[0].shape = w.groups[1].shape = "circle"
            r = ev.evaluate_image(s, sc.render_scene(w, 128))
            assert r["two_object"] is False and r["color"] is True, (s.key(), circles, r["details"])
        w = s.copy()
        w.groups[1].instances = []
        assert ev.evaluate_image(s, sc.render_scene(w, 128))["two_object"] is False
        n += 1
    assert n >= 8


def test_blob_gap():
    im = np.zeros((40, 40, 3), np.uint8)
    im[5:15, 5:15] = sc.PALETTE["red"]
    im[5:15, 18:28] = sc.PALETTE["blue"]  # columns 15-17 empty: nearest pixel centres 4 apart
    blobs = ev.detect_blobs(im, ["red", "blue"], ev.EvalParams(min_area_frac=0.01))
    assert ev.blob_gap(blobs["red"][0], blobs["blue"][0]) == pytest.approx(4.0)
    im[20:30, 15:25] = sc.PALETTE["green"]
    blobs = ev.detect_blobs(im, ["red", "green"], ev.EvalParams(min_area_frac=0.01))
    assert ev.blob_gap(blobs["red"][0], blobs["green"][0]) == pytest.approx(math.hypot(6, 1))


def test_evaluate_sets_and_agreement(kind_scenes, renders):
    scenes = kind_scenes[:12]
    en = renders[:12]
    zh = [im if i % 2 else np.ascontiguousarray(im[::-1, ::-1]) for i, im in enumerate(renders[:12])]
    rep = ev.evaluate_sets([s.to_dict() for s in scenes], en, zh, check_background=False)
    assert rep["en"]["overall"]["accuracy"] == 1.0
    assert rep["zh"]["overall"]["accuracy"] < 1.0
    assert 0.0 < rep["agreement"]["overall"] < 1.0 and rep["agreement"]["color"] == 1.0
    assert rep["en"]["background"]["n"] == 0
    assert set(rep["by_kind"]) == {s.kind for s in scenes}
    # per place: every stated place/relation counted once; the flipped Chinese pictures fail on the sides
    places = [g.position for s in scenes for g in s.groups if g.position]
    places += [s.relation.relation for s in scenes if s.relation is not None]
    assert sum(row["n"] for row in rep["by_place"].values()) == len(places)
    assert all(row["en"] == 1.0 for row in rep["by_place"].values())
    assert any(row["zh"] < 1.0 for row in rep["by_place"].values())
    # per named shape: every named object group counted once
    assert sum(row["n"] for row in rep["by_shape"].values()) == sum(len(s.groups) for s in scenes)
    assert all(row["en"] == 1.0 for row in rep["by_shape"].values())
    text = ev.format_report(rep)
    assert "overall" in text and all(k in text for k in (*rep["by_place"], *rep["by_shape"], "attribution"))
    with pytest.raises(TwigError):
        ev.evaluate_sets(scenes, en, zh[:3])


def test_paired_change_counts_pictures_lost_and_gained(kind_scenes, renders):
    scenes = [s.to_dict() for s in kind_scenes[:12]]
    flipped = [np.ascontiguousarray(im[:, ::-1]) if i % 3 == 0 else im for i, im in enumerate(renders[:12])]
    rep = ev.evaluate_sets(scenes, renders[:12], flipped, check_background=False)
    base, other = ev.verdicts(rep["results_en"]), ev.verdicts(rep["results_zh"])
    assert len(base) == 12 and all(len(v) == len(ev.CATEGORIES) for v in base)
    change = ev.paired_change(base, other)
    j = ev.CATEGORIES.index("position")
    pairs = [(b[j], o[j]) for b, o in zip(base, other) if b[j] is not None and o[j] is not None]
    lost = sum(b and not o for b, o in pairs)
    assert lost > 0 and change["position"]["lost"] == lost and change["position"]["gained"] == 0
    # the change is the accuracies' difference over the pictures both runs score, in points
    assert change["position"]["change"] == pytest.approx(-100 * lost / len(pairs))
    assert change["position"]["n"] == len(pairs) and change["position"]["se"] > 0
    assert change["color"] == {"change": 0.0, "lost": 0, "gained": 0, "n": 12, "se": 0.0}
    # the reverse comparison gains what this one lost; a run against itself changes nothing
    assert ev.paired_change(other, base)["position"]["gained"] == lost
    assert all(c["lost"] == c["gained"] == 0 for c in ev.paired_change(base, base).values())
    assert "position" in ev.format_change({"en": base, "zh": base}, {"en": other, "zh": base})
    with pytest.raises(TwigError):
        ev.paired_change(base, other[:3])


def test_eval_prompts():
    _, held = sc.generate_records(0, 5, seed=0)
    prompts = ev.eval_prompts(held, style="short")
    assert len(prompts) == 5 and all(p["check_background"] is False for p in prompts)
    prompts = ev.eval_prompts(held, style="long")
    assert all(p["check_background"] and CJK.search(p["zh"]) for p in prompts)


class _PoolingAutoencoder:
    """A stand-in DC-AE: a latent of one value per `factor`² pixels, decoded by bilinear upsampling (an identity
    for factor 1). Its coarser grid at 128² than at 256² loses more of each shape."""

    def __init__(self, factor):
        self.factor = factor

    def encode(self, x):
        import torch.nn.functional as F

        return F.avg_pool2d(x, self.factor) if self.factor > 1 else x

    def decode(self, z):
        import torch.nn.functional as F

        return F.interpolate(z, scale_factor=self.factor, mode="bilinear") if self.factor > 1 else z


def test_reference_report_scores_truth_and_reconstructions_at_both_sizes():
    from training.evaluate_demo import reference_report

    _, held = sc.generate_records(0, 16, seed=0)
    full = np.stack([sc.render_scene(sc.Scene.from_dict(r["scene"]), 256, 3) for r in held])
    exact = reference_report(_PoolingAutoencoder(1), held, full)
    assert exact["classifier"]["accuracy"] == 1.0 and set(exact["dcae"]) == {128, 256}
    for agg in [exact["truth"]] + [v["aggregate"] for v in exact["dcae"].values()]:
        assert all(v["accuracy"] == 1.0 for v in agg.values() if v["n"])
    lossy = reference_report(_PoolingAutoencoder(8), held, full)
    assert lossy["truth"] == exact["truth"]
    coarse, fine = lossy["dcae"][128]["objects"]["accuracy"], lossy["dcae"][256]["objects"]["accuracy"]
    assert coarse < fine and coarse < 0.8, (coarse, fine)
    assert "DC-AE 256" in lossy["text"] and "shape classifier on the ground-truth pictures: 1.000" in lossy["text"]
