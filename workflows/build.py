"""Example workflows: every graph is defined once in this file and written in the forms ComfyUI reads.

    workflows/<name>.json       UI workflow: drag it onto ComfyUI (or Workflow > Open); ComfyUI also lists these
                                in its template browser under this pack
    workflows/api/<name>.json   the same graph in API form, for ``POST /prompt``
    workflows/<name>.jpg        the template browser's thumbnail (ComfyUI's frontend asks for <name>.jpg), made from
                                the preview below
    workflows/<name>.png        a preview carrying both (PNG text chunks "workflow" and "prompt", as ComfyUI
                                writes them), so dropping the picture loads the graph too

    python workflows/build.py              write the JSON files, and the PNGs whose embedded graph changed
    python workflows/build.py --previews   render every preview again
    python workflows/build.py --check      exit 1 if a committed file differs from what this script writes

Previews of the demo-model workflows are real renders (the API form run on the CPU through the pack's node
functions, workflows/workflow_runner.py); the other workflows need weights that are not part of this repository,
so their preview is a drawing of the graph, labelled as such.

Model names below are what the workflows expect in ComfyUI's model folders (see the README's table).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
API_DIR = HERE / "api"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import comfy_core  # noqa: E402
from twig_core.catalog import DEMO_256_NAME, DEMO_NAME, demo_dir  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# What the workflows expect to find (file or folder names as the loader lists show them)

TWIG = "twig_v0_alpha.pth"  # models/diffusion_models: Twig v0 alpha, original-format fp16 .pth
GEMMA = "gemma-2-2b-it/"  # models/text_encoders: Gemma-2-2B-it Hugging Face folder (with tokenizer)
DCAE = "dc-ae-f32c32-sana-1.0-diffusers/"  # models/vae: DC-AE f32c32 diffusers folder
TIPO = "TIPO-500M-ft/"  # models/LLM: TIPO model folder
FACE_DETECTOR = "opencv_haar"  # built in once opencv-python-headless (4.x) is installed
INPUT_IMAGE = "example.png"  # ComfyUI ships input/example.png
DEMO = DEMO_NAME  # the demo model inside the pack (twig_core/demo_model)
DEMO_256 = DEMO_256_NAME  # its 256² sibling (twig_core/demo_model_256), which draws shapes

UI_VERSION = 0.4
CONTROL = "fixed"  # control_after_generate of every seed: the workflow reproduces its preview
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"


# ---------------------------------------------------------------------------------------------------
# Node declarations: the pack's own classes, and core ComfyUI's as written down in comfy_core.py


def node_spec(class_type: str) -> dict:
    """{"display_name", "input": {"required", "optional"}, "output", "output_name", "output_node"}."""
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    if class_type in NODE_CLASS_MAPPINGS:
        cls = NODE_CLASS_MAPPINGS[class_type]
        types = cls.INPUT_TYPES()
        return {
            "display_name": NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type),
            "input": {k: types[k] for k in ("required", "optional") if k in types},
            "output": tuple(cls.RETURN_TYPES),
            "output_name": tuple(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        }
    if class_type in comfy_core.SPECS:
        return comfy_core.SPECS[class_type]
    raise KeyError(f"unknown node class {class_type!r} (not in the pack, not in comfy_core.SPECS)")


def is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    combo = isinstance(kind, (list, tuple)) or kind == comfy_core.INPUT_FILES
    return (combo or kind in WIDGET_TYPES) and not opts.get("forceInput")


def has_control(name: str, spec) -> bool:
    """The frontend adds a control_after_generate widget right after this one (its value is saved too)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


def widget_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], (list, tuple)) or spec[0] == comfy_core.INPUT_FILES else spec[0]


def inputs_of(spec: dict):
    """(name, declaration, optional) in the order the frontend builds them."""
    for section in ("required", "optional"):
        for name, s in spec["input"].get(section, {}).items():
            yield name, s, section == "optional"


# ---------------------------------------------------------------------------------------------------
# Graph definition


@dataclass(frozen=True)
class Out:
    node: "Node"
    slot: int

    @property
    def type(self) -> str:
        return self.node.spec["output"][self.slot]


@dataclass
class Node:
    id: int
    class_type: str
    pos: tuple[int, int]
    size: tuple[int, int] | None
    title: str | None
    values: dict
    spec: dict = field(repr=False, default_factory=dict)
    note: str | None = None  # MarkdownNote text

    def __getitem__(self, key) -> Out:
        names = list(self.spec["output_name"])
        return Out(self, names.index(key) if isinstance(key, str) else int(key))

    @property
    def display_title(self) -> str:
        return self.title or self.spec.get("display_name", self.class_type)


@dataclass
class Workflow:
    name: str
    title: str
    summary: str  # one line for the README table
    needs: str  # weights, README table
    nodes: list[Node] = field(default_factory=list)
    demo: bool = False  # runs on the embedded demo model (preview rendered by running it)

    def add(self, class_type: str, pos, *, title: str | None = None, size=None, **values) -> Node:
        spec = node_spec(class_type)
        known = {n for n, _, _ in inputs_of(spec)}
        unknown = set(values) - known
        if unknown:
            raise KeyError(f"{class_type} has no input(s) {sorted(unknown)}")
        filled = {}
        for name, s, optional in inputs_of(spec):
            if name in values:
                filled[name] = values[name]
            elif is_widget(s) and not optional:
                opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
                if "default" in opts:
                    filled[name] = opts["default"]
                else:
                    raise ValueError(f"{self.name}: {class_type}.{name} needs a value (no default)")
            elif is_widget(s):
                opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
                filled[name] = opts.get("default", "")
            elif not optional:
                raise ValueError(f"{self.name}: {class_type}.{name} must be connected")
        node = Node(len(self.nodes) + 1, class_type, tuple(pos), tuple(size) if size else None, title, filled, spec)
        self.nodes.append(node)
        return node

    def note(self, pos, size, title: str, text: str) -> Node:
        node = Node(len(self.nodes) + 1, "MarkdownNote", tuple(pos), tuple(size), title, {}, {"output_name": ()}, note=text)
        self.nodes.append(node)
        return node

    # -- serialisation ------------------------------------------------------------------------------

    def _links(self) -> list[tuple[int, Out, Node, str]]:
        """(link id, source, target node, target input) in node order, then input order."""
        out, n = [], 0
        for node in self.nodes:
            if node.note is not None:
                continue
            for name, _, _ in inputs_of(node.spec):
                v = node.values.get(name)
                if isinstance(v, Out):
                    n += 1
                    out.append((n, v, node, name))
        return out

    def _order(self) -> dict[int, int]:
        deps = {node.id: set() for node in self.nodes}
        for _, src, dst, _ in self._links():
            deps[dst.id].add(src.node.id)
        order, done = {}, set()
        while len(done) < len(deps):
            ready = [n for n in sorted(deps) if n not in done and deps[n] <= done]
            if not ready:
                raise ValueError(f"{self.name}: cycle")
            for n in ready:
                order[n] = len(order)
                done.add(n)
        return order

    def api(self) -> dict:
        """The API form, as ComfyUI's frontend writes it ("Export (API)"): widgets by name, links as [id, slot]."""
        out = {}
        for node in self.nodes:
            if node.note is not None:
                continue
            inputs = {}
            for name, s, _ in inputs_of(node.spec):
                if name not in node.values:
                    continue
                v = node.values[name]
                inputs[name] = [str(v.node.id), v.slot] if isinstance(v, Out) else v
            out[str(node.id)] = {"inputs": inputs, "class_type": node.class_type, "_meta": {"title": node.display_title}}
        return out

    def ui(self) -> dict:
        """The UI form (workflow version 0.4) as ComfyUI's frontend saves it."""
        links = self._links()
        order = self._order()
        link_in = {(dst.id, name): lid for lid, _, dst, name in links}
        link_out: dict[tuple[int, int], list[int]] = {}
        for lid, src, _, _ in links:
            link_out.setdefault((src.node.id, src.slot), []).append(lid)
        nodes, ui_links = [], []
        slot_of: dict[tuple[int, str], int] = {}
        for node in self.nodes:
            if node.note is not None:
                nodes.append({
                    "id": node.id, "type": node.class_type, "pos": list(node.pos), "size": list(node.size),
                    "flags": {}, "order": order[node.id], "mode": 0, "inputs": [], "outputs": [], "title": node.title,
                    "properties": {}, "widgets_values": [node.note], "color": NOTE_COLOR, "bgcolor": NOTE_BGCOLOR,
                })
                continue
            inputs, widgets = [], []
            for name, s, optional in inputs_of(node.spec):
                if not is_widget(s):
                    entry = {"name": name, "type": s[0]}
                    if optional:
                        entry["shape"] = 7
                    entry["link"] = link_in.get((node.id, name))
                    slot_of[(node.id, name)] = len(inputs)
                    inputs.append(entry)
            for name, s, optional in inputs_of(node.spec):
                if is_widget(s):
                    if (node.id, name) in link_in:  # a widget fed by a link: the frontend adds an input slot
                        slot_of[(node.id, name)] = len(inputs)
                        inputs.append({"name": name, "type": widget_type(s), "widget": {"name": name},
                                       "link": link_in[(node.id, name)]})
                    v = node.values.get(name)
                    widgets.append(s[1].get("default", "") if isinstance(v, Out) else v)
                    if has_control(name, s):
                        widgets.append(CONTROL)
            outputs = [{"name": n, "type": t, "links": link_out.get((node.id, i), []), "slot_index": i}
                       for i, (t, n) in enumerate(zip(node.spec["output"], node.spec["output_name"]))]
            entry = {"id": node.id, "type": node.class_type, "pos": list(node.pos),
                     "size": list(node.size or estimate_size(node)), "flags": {}, "order": order[node.id], "mode": 0,
                     "inputs": inputs, "outputs": outputs}
            if node.title:
                entry["title"] = node.title
            entry["properties"] = {"Node name for S&R": node.class_type}
            entry["widgets_values"] = widgets
            nodes.append(entry)
        for lid, src, dst, name in links:
            ui_links.append([lid, src.node.id, src.slot, dst.id, slot_of[(dst.id, name)], src.type])
        return {
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": ui_links,
            "groups": [],
            "config": {},
            # the view opens on the whole graph's top-left corner
            "extra": {"ds": {"scale": 0.7, "offset": [40 - min(n.pos[0] for n in self.nodes),
                                                      70 - min(n.pos[1] for n in self.nodes)]}},
            "version": UI_VERSION,
        }


def estimate_size(node: Node) -> tuple[int, int]:
    """A size close to what the frontend computes for the node (slots 20 px, widgets 24 px, text boxes more)."""
    sockets = sum(1 for _, s, _ in inputs_of(node.spec) if not is_widget(s))
    slots = max(sockets, len(node.spec["output"]))
    height = 10 + slots * 22
    for name, s, _ in inputs_of(node.spec):
        if is_widget(s):
            multiline = len(s) > 1 and isinstance(s[1], dict) and s[1].get("multiline")
            height += 90 if multiline else 24
            height += 24 if has_control(name, s) else 0
    return 330, height


# ---------------------------------------------------------------------------------------------------
# The workflows

EN_PROMPT = "a red fox sitting in fresh snow at the edge of a birch forest, golden morning light, soft watercolor, detailed fur"

ZH_LONG_PROMPT = (
    "一幅细腻的写实风格画面，描绘黄昏时分的江南水乡古镇。画面中央是一条蜿蜒的河道，河水平静清澈，倒映着两岸白墙黛瓦的老房子和天边"
    "橙红色的晚霞。河道左侧是一排两层的木结构民居，墙面斑驳，露出岁月留下的青灰色痕迹，二楼的木窗半开，窗台上摆着几盆盛开的红色"
    "天竺葵和一只正在打盹的橘色花猫。屋檐下挂着一串串红灯笼，灯笼已经点亮，温暖的光晕在湿润的空气中微微扩散。河道右侧是一条临水"
    "的石板小路，路边有一家老茶馆，门口挂着写有“茶”字的布幌子，几张竹椅和一张方木桌摆在门外，桌上放着一把紫砂壶和两只青花瓷茶杯，"
    "茶水还冒着淡淡的热气。一位穿着靛蓝色棉布衣裳的老奶奶坐在竹椅上，手里拿着蒲扇，笑容慈祥，正望着河面。画面前景是一座半圆形的"
    "石拱桥，桥身爬满了深绿色的青苔和细小的蕨类植物，桥栏上雕刻着莲花和祥云的图案，桥洞与水中的倒影正好组成一个完整的圆。一艘乌篷"
    "船正从桥洞中缓缓驶出，船夫戴着斗笠，身披蓑衣，用长长的竹篙撑船，船头放着一篮新鲜的菱角和莲蓬，船尾荡开一圈圈细密的涟漪。远处"
    "是层层叠叠的马头墙和几棵高大的香樟树，树冠浓密，几只归巢的燕子从枝叶间掠过。更远的地方，淡淡的青山在薄雾中若隐若现，山顶上有"
    "一座小小的宝塔，塔尖被最后一缕夕阳照亮，闪着金色的光。天空从地平线处的橙红色渐渐过渡到头顶的淡紫色和深蓝色，几朵云被染成粉色"
    "和金色，一弯新月已经悄悄升起。拱桥上站着一对年轻的恋人，女孩穿着淡青色的旗袍，撑着一把绘有梅花的油纸伞，男孩穿着白色衬衫，"
    "正指着远处的宝塔轻声说话，两人的身影倒映在水面上，随着涟漪轻轻摇晃。桥头的老槐树下趴着一只黑白相间的小狗，懒洋洋地看着来往的"
    "行人。河边的石阶上放着几只竹篮，篮子里装满了刚洗好的青菜和红辣椒，水珠还在菜叶上闪闪发亮。几片粉白色的荷花在河道拐角处静静开放，"
    "荷叶上停着一只蓝色的蜻蜓。整体光线柔和，暖色的灯光与冷色的暮色形成鲜明而和谐的对比，空气中带着雨后的湿润感，石板路面微微"
    "反光，映出灯笼的红色倒影。构图采用三分法，拱桥位于画面下方三分之一处，视线沿着河道引向远处的宝塔，层次丰富，景深自然，近处的"
    "细节清晰锐利，远处逐渐柔化。画面风格融合了中国传统水墨画的意境与现代摄影的真实质感，色彩饱满而不艳俗，细节丰富，超高清，电影级"
    "光影，安静、温暖、怀旧的氛围。"
)

IMG2IMG_PROMPT = ("a girl with blonde pigtails in a pink dress standing on a green hill under a blue sky with white clouds, "
                  "arms stretched out, storybook illustration, soft colored pencil and watercolor")

FACE_PROMPT = ("photo of two friends laughing at a small cafe table by the window, natural light, 35mm, "
               "detailed faces, shallow depth of field")

LARGE_PROMPT = ("a vast alpine valley at sunrise, a winding river, wooden cabins, pine forests, snowy peaks, "
                "mist in the valley, highly detailed landscape photograph")

DEMO_EN = "a red circle on the left and a blue square on the right"
DEMO_ZH = "左边一个红色的圆，右边一个蓝色的正方形"
DEMO_EDIT = "a green circle on the left and a blue square on the right"
DEMO_256_EN = "a yellow triangle on the left and a blue square on the right"
DEMO_256_ZH = "左边一个黄色的三角形，右边一个蓝色的正方形"

SQUARE = "1024x1024 (1.00:1)"

NEEDS_TWIG = "the three Twig weights"  # listed under the README's table and in each workflow's note


def loaders(wf: Workflow, model: str, text_encoder: str, vae: str, max_tokens: int = 300, x: int = 0, y: int = 0):
    m = wf.add("TwigModelLoader", (x, y), model_name=model)
    te = wf.add("TwigTextEncoderLoader", (x, y + 150), text_encoder_name=text_encoder, max_tokens=max_tokens)
    v = wf.add("TwigVAELoader", (x, y + 322), vae_model=vae)
    return m, te, v


def weights_note(wf: Workflow, pos, extra: str = "") -> None:
    text = (
        "**Weights** (names as the loaders expect them):\n\n"
        f"- `models/diffusion_models/{TWIG}` — Twig v0 alpha\n"
        f"- `models/text_encoders/{GEMMA}` — Gemma-2-2B-it folder with its tokenizer\n"
        f"- `models/vae/{DCAE}` — DC-AE f32c32 (Sana 1.0) diffusers folder\n"
        + extra +
        "\nOther names work too: pick them in the three loaders. Nothing is downloaded at run time."
    )
    wf.note(pos, (480, 250), "Weights", text)


def text_to_image(name, title, summary, prompt, max_tokens, aspect, seed, prefix, note_extra="") -> Workflow:
    wf = Workflow(name, title, summary, NEEDS_TWIG)
    weights_note(wf, (-520, 0), note_extra)
    m, te, v = loaders(wf, TWIG, GEMMA, DCAE, max_tokens)
    enc = wf.add("TwigTextEncode", (380, 0), size=(420, 420), text_encoder=te[0], positive=prompt, negative="")
    lat = wf.add("TwigEmptyLatent", (380, 460), aspect_ratio=aspect, model=m[0])
    s = wf.add("TwigSampler", (840, 0), model=m[0], positive=enc[0], negative=enc[1], latent=lat[0], seed=seed)
    d = wf.add("TwigVAEDecode", (840, 330), samples=s[0], vae=v[0])
    wf.add("SaveImage", (1200, 0), size=(520, 560), images=d[0], filename_prefix=prefix)
    return wf


def wf_text_to_image() -> Workflow:
    return text_to_image("text_to_image", "Text to image (English)", "Twig v0 alpha text to image, 1024², English prompt",
                         EN_PROMPT, 300, SQUARE, 42, "twig_text_to_image")


def wf_chinese_long() -> Workflow:
    return text_to_image(
        "text_to_image_chinese_long", "Text to image, long Chinese prompt (1200 tokens)",
        "a long, detailed Chinese prompt (about 1000 characters) with the text encoder's budget raised to 1200 "
        "tokens (Sana's 300 would cut it off halfway)", ZH_LONG_PROMPT, 1200, "1216x832 (1.46:1)", 7, "twig_chinese_long",
        "\n`max_tokens` on the text encoder loader is 1200: the live count under the prompt shows how much of it "
        "fits (Sana's default 300 would drop most of this prompt).\n")


def wf_tipo() -> Workflow:
    wf = Workflow("tipo_text_to_image", "TIPO prompt expansion → text to image",
                  "a few tags and a short sentence expanded into a detailed prompt by TIPO, then text to image",
                  NEEDS_TWIG + f" + TIPO in `models/LLM/{TIPO}`")
    weights_note(wf, (-520, 0), f"- `models/LLM/{TIPO}` — TIPO prompt model (folder as published)\n")
    m, te, v = loaders(wf, TWIG, GEMMA, DCAE, 600, x=0, y=20)
    tipo = wf.add("TwigTIPO", (520, -280), size=(420, 720),
                  tags="1girl, solo, red hair, long hair, green eyes, smile, reading, book, library, window, sunlight",
                  nl_prompt="A girl with red hair reads a book by a sunny library window.",
                  seed=7, tag_length="long", nl_length="short", model=TIPO)
    enc = wf.add("TwigTextEncode", (980, -280), size=(420, 420), text_encoder=te[0], positive=tipo[0], negative="")
    lat = wf.add("TwigEmptyLatent", (980, 180), aspect_ratio="896x1152 (0.78:1)", model=m[0])
    s = wf.add("TwigSampler", (1440, -280), model=m[0], positive=enc[0], negative=enc[1], latent=lat[0], seed=42)
    d = wf.add("TwigVAEDecode", (1440, 50), samples=s[0], vae=v[0])
    wf.add("SaveImage", (1800, -280), size=(460, 620), images=d[0], filename_prefix="twig_tipo")
    return wf


def wf_face_refine() -> Workflow:
    wf = Workflow("text_to_image_face_refine", "Text to image → face refine",
                  "text to image, then every face found is drawn again at a higher resolution and pasted back "
                  f"(detector `{FACE_DETECTOR}`)",
                  NEEDS_TWIG + " + OpenCV (`pip install \"opencv-python-headless<5\"`)")
    weights_note(wf, (-520, 0), f"- face detector `{FACE_DETECTOR}`: `pip install \"opencv-python-headless<5\"` "
                                "(or pick mediapipe / a YOLO model from models/ultralytics/bbox)\n")
    m, te, v = loaders(wf, TWIG, GEMMA, DCAE, 300)
    enc = wf.add("TwigTextEncode", (380, 0), size=(420, 420), text_encoder=te[0], positive=FACE_PROMPT, negative="")
    lat = wf.add("TwigEmptyLatent", (380, 460), aspect_ratio="1216x832 (1.46:1)", model=m[0])
    s = wf.add("TwigSampler", (840, 0), model=m[0], positive=enc[0], negative=enc[1], latent=lat[0], seed=42)
    d = wf.add("TwigVAEDecode", (840, 330), samples=s[0], vae=v[0])
    wf.add("SaveImage", (840, 460), size=(420, 360), title="Before face refine", images=d[0],
           filename_prefix="twig_face_before")
    fr = wf.add("TwigFaceRefine", (1300, 0), size=(400, 820), image=d[0], model=m[0], vae=v[0], positive=enc[0],
                negative=enc[1], detector=FACE_DETECTOR, seed=42)
    wf.add("SaveImage", (1740, 0), size=(520, 420), images=fr[0], filename_prefix="twig_face_refined")
    wf.add("PreviewImage", (1740, 460), size=(520, 300), title="Faces after refine", images=fr["crops_after"])
    return wf


def wf_image_to_image() -> Workflow:
    wf = Workflow("image_to_image", "Image to image from a loaded picture",
                  f"ComfyUI's `input/{INPUT_IMAGE}` redrawn from a prompt at denoise 0.6 (DC-AE encode → sampler → decode)",
                  NEEDS_TWIG + f" (`input/{INPUT_IMAGE}` ships with ComfyUI)")
    weights_note(wf, (-520, 0), f"- `input/{INPUT_IMAGE}` ships with ComfyUI; load your own picture instead\n")
    m, te, v = loaders(wf, TWIG, GEMMA, DCAE, 300)
    img = wf.add("LoadImage", (380, -280), size=(320, 360), image=INPUT_IMAGE)
    enc = wf.add("TwigTextEncode", (380, 120), size=(420, 420), text_encoder=te[0], positive=IMG2IMG_PROMPT, negative="")
    lat = wf.add("TwigVAEEncode", (840, -280), pixels=img[0], vae=v[0])
    s = wf.add("TwigSampler", (840, -140), model=m[0], positive=enc[0], negative=enc[1], latent=lat[0], seed=42,
               denoise=0.6)
    d = wf.add("TwigVAEDecode", (840, 200), samples=s[0], vae=v[0])
    wf.add("SaveImage", (1200, -280), size=(480, 520), images=d[0], filename_prefix="twig_image_to_image")
    return wf


def wf_large() -> Workflow:
    wf = Workflow("large_2048_tiled", "Large image: 2048² with tiled DC-AE",
                  "1024² text to image, upscaled to 2048² and refined at denoise 0.5; DC-AE encodes and decodes "
                  "the 2048² image in 1024 px tiles", NEEDS_TWIG)
    weights_note(wf, (-520, 0), "\nTiles of 1024 px keep the DC-AE's memory flat; 0 = automatic (tiles above 1024²).\n")
    m, te, v = loaders(wf, TWIG, GEMMA, DCAE, 300)
    enc = wf.add("TwigTextEncode", (380, 0), size=(420, 420), text_encoder=te[0], positive=LARGE_PROMPT, negative="")
    lat = wf.add("TwigEmptyLatent", (380, 460), aspect_ratio=SQUARE, model=m[0])
    s1 = wf.add("TwigSampler", (840, 0), title="Twig Sampler (1024²)", model=m[0], positive=enc[0], negative=enc[1],
                latent=lat[0], seed=42)
    d1 = wf.add("TwigVAEDecode", (840, 330), samples=s1[0], vae=v[0])
    up = wf.add("ImageScale", (840, 460), image=d1[0], upscale_method="lanczos", width=2048, height=2048, crop="disabled")
    e2 = wf.add("TwigVAEEncode", (1200, 0), title="Twig VAE Encode (tiled)", pixels=up[0], vae=v[0], tile_size=1024)
    s2 = wf.add("TwigSampler", (1200, 140), title="Twig Sampler (2048², denoise 0.5)", model=m[0], positive=enc[0],
                negative=enc[1], latent=e2[0], seed=43, denoise=0.5, shift=6.0)
    d2 = wf.add("TwigVAEDecode", (1200, 470), title="Twig VAE Decode (tiled)", samples=s2[0], vae=v[0], tile_size=1024)
    wf.add("SaveImage", (1560, 0), size=(560, 600), images=d2[0], filename_prefix="twig_2048")
    return wf


def demo_loaders(wf: Workflow):
    return loaders(wf, DEMO, DEMO, DEMO, 300)


DEMO_NOTE = (
    "**Runs as is** — the small demo model ships inside the pack (`twig-demo (embedded)` in all three loaders), "
    "nothing to download. It was trained on pictures of simple coloured shapes at 128×128, so ask for shapes, "
    "colours and positions, in English or Chinese: *a red circle on the left and a blue square on the right*, "
    "*左边一个红色的圆，右边一个蓝色的正方形*.\n\n"
    "Twig Empty Latent gets the model, so its 1024² choice becomes the demo's own 128²."
)


DEMO_256_NOTE = (
    "**Runs as is** — the 256×256 demo model ships inside the pack too (`twig-demo 256 (embedded)` in all three "
    "loaders). Its 8×8 latents keep the shapes that the 128² model's 4×4 ones lose: circles, squares and triangles "
    "come out as asked most of the time, diamonds, rings and crosses less often, stars seldom. Colours, positions "
    "and counts of one to three, in English or Chinese.\n\n"
    "Twig Empty Latent gets the model, so its 1024² choice becomes the demo's own 256²."
)


def demo_pair(name: str, title: str, summary: str, model: str, note: str, en: str, zh: str, seed: int,
              prefix: str) -> Workflow:
    """A demo model draws the same scene from an English and a Chinese prompt."""
    wf = Workflow(name, title, summary, "nothing (the demo model is inside the pack)", demo=True)
    wf.note((-520, -280), (480, 250), "The demo model", note)
    m, te, v = loaders(wf, model, model, model, 300)
    en = wf.add("TwigTextEncode", (380, -280), size=(420, 290), title="Twig Text Encode (English)", text_encoder=te[0],
                positive=en, negative="")
    zh = wf.add("TwigTextEncode", (380, 50), size=(420, 290), title="Twig Text Encode (Chinese)", text_encoder=te[0],
                positive=zh, negative="")
    lat = wf.add("TwigEmptyLatent", (380, 380), aspect_ratio=SQUARE, model=m[0])
    s1 = wf.add("TwigSampler", (840, -280), title="Twig Sampler (English)", model=m[0], positive=en[0], negative=en[1],
                latent=lat[0], seed=seed)
    s2 = wf.add("TwigSampler", (840, 80), title="Twig Sampler (Chinese)", model=m[0], positive=zh[0], negative=zh[1],
                latent=lat[0], seed=seed)
    d1 = wf.add("TwigVAEDecode", (1200, -280), samples=s1[0], vae=v[0])
    d2 = wf.add("TwigVAEDecode", (1200, 80), samples=s2[0], vae=v[0])
    wf.add("SaveImage", (1560, -280), size=(300, 320), title="English", images=d1[0], filename_prefix=f"{prefix}_en")
    wf.add("SaveImage", (1560, 80), size=(300, 320), title="Chinese", images=d2[0], filename_prefix=f"{prefix}_zh")
    return wf


def wf_demo() -> Workflow:
    return demo_pair("demo_text_to_image", "Demo model: text to image, English and Chinese",
                     "the embedded demo model draws the same scene from an English and a Chinese prompt (128²)",
                     DEMO, DEMO_NOTE, DEMO_EN, DEMO_ZH, 10, "twig_demo")


def wf_demo_256() -> Workflow:
    return demo_pair("demo_256_text_to_image", "Demo model 256²: shapes, English and Chinese",
                     "the embedded 256² demo model draws the shapes a prompt names, in English and Chinese",
                     DEMO_256, DEMO_256_NOTE, DEMO_256_EN, DEMO_256_ZH, 10, "twig_demo_256")


def wf_demo_img2img() -> Workflow:
    wf = Workflow("demo_image_to_image", "Demo model: image to image",
                  "the demo model draws a scene, then redraws it from an edited prompt at denoise 0.7 "
                  "(DC-AE encode → sampler → decode)", "nothing (the demo model is inside the pack)", demo=True)
    wf.note((-520, -280), (480, 250), "The demo model", DEMO_NOTE)
    m, te, v = demo_loaders(wf)
    a = wf.add("TwigTextEncode", (380, -280), size=(420, 290), title="Twig Text Encode (first picture)",
               text_encoder=te[0], positive=DEMO_EN, negative="")
    b = wf.add("TwigTextEncode", (380, 50), size=(420, 290), title="Twig Text Encode (edit)", text_encoder=te[0],
               positive=DEMO_EDIT, negative="")
    lat = wf.add("TwigEmptyLatent", (380, 380), aspect_ratio=SQUARE, model=m[0])
    s1 = wf.add("TwigSampler", (840, -280), model=m[0], positive=a[0], negative=a[1], latent=lat[0], seed=10)
    d1 = wf.add("TwigVAEDecode", (840, 50), samples=s1[0], vae=v[0])
    wf.add("SaveImage", (840, 190), size=(300, 320), title="First picture", images=d1[0], filename_prefix="twig_demo_first")
    e = wf.add("TwigVAEEncode", (1200, -280), pixels=d1[0], vae=v[0])
    s2 = wf.add("TwigSampler", (1200, -140), title="Twig Sampler (denoise 0.7)", model=m[0], positive=b[0],
                negative=b[1], latent=e[0], seed=12, denoise=0.7)
    d2 = wf.add("TwigVAEDecode", (1200, 190), samples=s2[0], vae=v[0])
    wf.add("SaveImage", (1560, -280), size=(300, 320), title="Edited", images=d2[0], filename_prefix="twig_demo_edited")
    return wf


LORA_NOTE = (
    "**A LoRA trained here** — `twig_demo_pink` (in `twig_core/demo_loras`, listed with the files of "
    "`models/loras`) teaches the demo model a colour it was never shown: *pink* / *粉色*. Without it the model has "
    "no picture for the word and draws an empty background; with it, the same seed draws the pink object. Chain "
    "more **Twig LoRA Loader**s to stack LoRAs; the strength (0 = off) changes nothing in the loaded model.\n\n"
    "Remade by `python -m training demo --work DIR --stage lora`."
)
DEMO_PINK_EN, DEMO_PINK_ZH = "a pink circle", "一个粉色的圆"
DEMO_LORA = "twig_demo_pink.safetensors"


def wf_demo_lora() -> Workflow:
    wf = Workflow("demo_lora", "Demo model with and without a LoRA",
                  "the same seed without and with the demo LoRA that teaches the colour pink (English and Chinese)",
                  "nothing (the demo model and its LoRA are inside the pack)", demo=True)
    wf.note((-520, -280), (480, 300), "The demo LoRA", LORA_NOTE)
    m, te, v = demo_loaders(wf)
    lm = wf.add("TwigLoraLoader", (380, 380), model=m[0], lora=DEMO_LORA, strength=1.0)
    lat = wf.add("TwigEmptyLatent", (380, 540), aspect_ratio=SQUARE, model=m[0])
    encs = [wf.add("TwigTextEncode", (380, y), size=(420, 290), title=f"Twig Text Encode ({lang})",
                   text_encoder=te[0], positive=text, negative="")
            for y, lang, text in ((-280, "English", DEMO_PINK_EN), (50, "Chinese", DEMO_PINK_ZH))]
    for row, (enc, lang) in enumerate(zip(encs, ("en", "zh"))):
        for col, (model, label) in enumerate(((m, "without LoRA"), (lm, "with LoRA"))):
            x, y = 840 + 360 * col, -280 + 440 * row
            s = wf.add("TwigSampler", (x, y), title=f"Twig Sampler ({lang}, {label})", model=model[0],
                       positive=enc[0], negative=enc[1], latent=lat[0], seed=5)
            d = wf.add("TwigVAEDecode", (x, y + 310), samples=s[0], vae=v[0])
            wf.add("SaveImage", (1600 + 340 * col, y), size=(300, 320), title=f"{lang}, {label}", images=d[0],
                   filename_prefix=f"twig_demo_{lang}_{'lora' if col else 'base'}")
    return wf


NATIVE_NOTE = (
    "**Core ComfyUI nodes with Twig** — the Twig loaders feed *Twig → native MODEL*, *Twig Text Encode (native "
    "CONDITIONING)* and *Twig → native VAE*, and ComfyUI's own **KSampler** and **VAE Decode** do the rest, so "
    "model patches, other samplers and packs built on core nodes work with Twig too. Runs as is on the embedded "
    "demo model (nothing to download); swap the three loaders' choices for the real weights.\n\n"
    "Use Twig Empty Latent (a core Empty Latent Image has the wrong channels and size), and keep native and Twig "
    "latents apart: core VAE Encode/Decode work on ComfyUI's raw latents, the Twig VAE nodes on scaled ones."
)
NATIVE_NEEDS = "nothing (the demo model is inside the pack; the preview is a drawing: core nodes run only in ComfyUI)"


def native_parts(wf: Workflow, prompt: str, y: int = -280):
    m, te, v = demo_loaders(wf)
    nm = wf.add("TwigToNativeModel", (380, 380), model=m[0])
    nv = wf.add("TwigToNativeVAE", (380, 480), vae=v[0])
    enc = wf.add("TwigTextEncodeNative", (380, y), size=(420, 290), text_encoder=te[0], positive=prompt, negative="")
    lat = wf.add("TwigEmptyLatent", (380, 580), aspect_ratio=SQUARE, model=m[0])
    return nm, nv, enc, lat, te


def wf_demo_native() -> Workflow:
    wf = Workflow("demo_native_text_to_image", "Demo model through core KSampler and VAE Decode",
                  "the demo model as a native MODEL/CONDITIONING/VAE: core KSampler (euler, simple) and core VAE "
                  "Decode (128²)", NATIVE_NEEDS)
    wf.note((-520, -280), (480, 300), "Twig in core nodes", NATIVE_NOTE)
    nm, nv, enc, lat, _ = native_parts(wf, DEMO_EN)
    s = wf.add("KSampler", (840, -280), size=(320, 470), model=nm[0], positive=enc[0], negative=enc[1],
               latent_image=lat[0], seed=10, steps=20, cfg=4.5, sampler_name="euler", scheduler="simple")
    d = wf.add("VAEDecode", (1200, -280), samples=s[0], vae=nv[0])
    wf.add("SaveImage", (1560, -280), size=(300, 320), images=d[0], filename_prefix="twig_native")
    return wf


def wf_demo_native_img2img() -> Workflow:
    wf = Workflow("demo_native_image_to_image", "Demo model: image to image through core nodes",
                  "core KSampler draws a scene, core VAE Encode and a second KSampler (denoise 0.7) redraw it from "
                  "an edited prompt", NATIVE_NEEDS)
    wf.note((-520, -280), (480, 300), "Twig in core nodes", NATIVE_NOTE)
    nm, nv, enc, lat, te = native_parts(wf, DEMO_EN)
    edit = wf.add("TwigTextEncodeNative", (380, 50), size=(420, 290), title="Twig Text Encode (native, edit)",
                  text_encoder=te[0], positive=DEMO_EDIT, negative="")
    s1 = wf.add("KSampler", (840, -280), size=(320, 470), model=nm[0], positive=enc[0], negative=enc[1],
                latent_image=lat[0], seed=10, steps=20, cfg=4.5, sampler_name="euler", scheduler="simple")
    d1 = wf.add("VAEDecode", (840, 230), samples=s1[0], vae=nv[0])
    wf.add("SaveImage", (840, 330), size=(300, 320), title="First picture", images=d1[0], filename_prefix="twig_native_first")
    e = wf.add("VAEEncode", (1200, -280), pixels=d1[0], vae=nv[0])
    s2 = wf.add("KSampler", (1200, -180), size=(320, 470), title="KSampler (denoise 0.7)", model=nm[0],
                positive=edit[0], negative=edit[1], latent_image=e[0], seed=12, steps=20, cfg=4.5,
                sampler_name="euler", scheduler="simple", denoise=0.7)
    d2 = wf.add("VAEDecode", (1200, 330), samples=s2[0], vae=nv[0])
    wf.add("SaveImage", (1560, -280), size=(300, 320), title="Edited", images=d2[0], filename_prefix="twig_native_edited")
    return wf


def wf_native_face_refine() -> Workflow:
    wf = Workflow("text_to_image_native_face_refine", "Face refine made of core nodes",
                  "core KSampler draws the picture; Twig Face Detect's mask, core VAE Encode and Set Latent Noise Mask "
                  "and a second core KSampler (denoise 0.45) redraw only the faces, at the picture's resolution",
                  NEEDS_TWIG + " + OpenCV (`pip install \"opencv-python-headless<5\"`)")
    weights_note(wf, (-520, 0), f"- face detector `{FACE_DETECTOR}`: `pip install \"opencv-python-headless<5\"`\n")
    m, te, v = loaders(wf, TWIG, GEMMA, DCAE, 300)
    nm = wf.add("TwigToNativeModel", (0, 470), model=m[0])
    nv = wf.add("TwigToNativeVAE", (0, 570), vae=v[0])
    enc = wf.add("TwigTextEncodeNative", (380, 0), size=(420, 330), text_encoder=te[0], positive=FACE_PROMPT,
                 negative="")
    lat = wf.add("TwigEmptyLatent", (380, 370), aspect_ratio="1216x832 (1.46:1)", model=m[0])
    sampler = dict(steps=20, cfg=4.5, sampler_name="twig_flow_dpmpp_2m", scheduler="twig_flow_dpmpp_2m")
    s1 = wf.add("KSampler", (840, 0), size=(320, 470), model=nm[0], positive=enc[0], negative=enc[1],
                latent_image=lat[0], seed=42, **sampler)
    d1 = wf.add("VAEDecode", (840, 510), samples=s1[0], vae=nv[0])
    fd = wf.add("TwigFaceDetect", (1200, 0), size=(340, 420), image=d1[0], detector=FACE_DETECTOR, dilate=16)
    e = wf.add("VAEEncode", (1200, 460), pixels=d1[0], vae=nv[0])
    masked = wf.add("SetLatentNoiseMask", (1200, 560), samples=e[0], mask=fd[1])
    s2 = wf.add("KSampler", (1580, 0), size=(320, 470), title="KSampler (faces, denoise 0.45)", model=nm[0],
                positive=enc[0], negative=enc[1], latent_image=masked[0], seed=43, denoise=0.45, **sampler)
    d2 = wf.add("VAEDecode", (1580, 510), samples=s2[0], vae=nv[0])
    wf.add("PreviewImage", (1940, 460), size=(420, 300), title="Faces found", images=fd[2])
    wf.add("SaveImage", (1940, 0), size=(420, 420), images=d2[0], filename_prefix="twig_native_faces")
    return wf


BUILDERS = (wf_text_to_image, wf_chinese_long, wf_tipo, wf_face_refine, wf_image_to_image, wf_large, wf_demo,
            wf_demo_256, wf_demo_img2img, wf_demo_lora, wf_demo_native, wf_demo_native_img2img, wf_native_face_refine)


TITLE_HEIGHT = 30  # the frontend draws a node's title bar above its position
GAP = 8  # free pixels kept between nodes
# Samplers show live previews: the frontend then adds an image widget of at least 220 px to the node
PREVIEW_ROOM = {"TwigSampler": 220, "KSampler": 220}


def _box(n: Node) -> tuple[int, int, int, int]:
    """A node's box on the canvas: title bar, body and a sampler's preview room."""
    w, h = n.size or estimate_size(n)
    x, y = n.pos
    return x, y - TITLE_HEIGHT, x + w, y + h + PREVIEW_ROOM.get(n.class_type, 0)


def settle(wf: Workflow) -> Workflow:
    """Move nodes down, top to bottom, until none overlaps one above it: the builders place nodes by column and
    row, and this makes room wherever a node (or a sampler's preview) is taller than its row."""
    placed: list[Node] = []
    for n in sorted(wf.nodes, key=lambda n: (n.pos[1], n.pos[0])):
        moved = True
        while moved:  # a move can bring it onto another node placed before: look again
            moved = False
            x0, y0, x1, y1 = _box(n)
            for p in placed:
                px0, py0, px1, py1 = _box(p)
                if x0 < px1 + GAP and px0 < x1 + GAP and y0 < py1 + GAP and py0 < y1 + GAP:
                    n.pos, moved = (n.pos[0], py1 + GAP + TITLE_HEIGHT), True
                    break
        placed.append(n)
    return wf


def overlaps(wf: Workflow) -> list[str]:
    """Pairs of nodes whose boxes (title bar included, with GAP between them, and a sampler's room for its live
    preview) overlap on the canvas. Sizes are the ones written into the workflow (estimate_size or given), which
    the frontend keeps: it only grows a node to its computed minimum (the real-host check saw none above these)
    or when a preview arrives."""
    boxes = [(n, *_box(n)) for n in wf.nodes]
    out = []
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1:]:
            if ax0 < bx1 + GAP and bx0 < ax1 + GAP and ay0 < by1 + GAP and by0 < ay1 + GAP:
                out.append(f"{wf.name}: {a.title or a.class_type} (#{a.id}) and {b.title or b.class_type} (#{b.id}) "
                           "overlap")
    return out


def workflows() -> list[Workflow]:
    return [settle(b()) for b in BUILDERS]


# ---------------------------------------------------------------------------------------------------
# Files


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def png_chunks(path: Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as im:
        return {k: v for k, v in im.text.items()}


def save_png(image, path: Path, wf: Workflow) -> None:
    """Write ``image`` with the graph embedded the way ComfyUI's SaveImage does (tEXt "prompt" and "workflow")."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", json.dumps(wf.api()))
    info.add_text("workflow", json.dumps(wf.ui()))
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=info, optimize=True)
    path.write_bytes(buf.getvalue())


THUMB_SIZE = 512  # longest side of a template thumbnail, px


def save_thumbnail(png: Path) -> Path:
    """``<name>.jpg`` beside the preview: what the template browser shows for the workflow."""
    from PIL import Image

    jpg = png.with_suffix(".jpg")
    with Image.open(png) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB_SIZE, THUMB_SIZE))
        im.save(jpg, "JPEG", quality=85, optimize=True)
    return jpg


def thumbnail_problem(png: Path) -> str | None:
    """Why ``<name>.jpg`` is not the thumbnail of the preview ``png`` (missing, not a JPEG, other proportions)."""
    from PIL import Image

    jpg = png.with_suffix(".jpg")
    if not jpg.is_file():
        return f"{jpg.relative_to(ROOT)} (template thumbnail) is missing"
    with Image.open(jpg) as im, Image.open(png) as full:
        want = full.copy()
        want.thumbnail((THUMB_SIZE, THUMB_SIZE))
        if im.format != "JPEG" or im.size != want.size:
            return f"{jpg.relative_to(ROOT)} is not the {want.size} JPEG thumbnail of {png.name}"
    return None


def render_demo(wf: Workflow):
    """Run the workflow on the embedded demo model (CPU) and lay its saved images out side by side."""
    import workflow_runner as runner
    from nodes import NODE_CLASS_MAPPINGS

    runner.SaveImage.saved = []
    runner.execute(wf.api(), NODE_CLASS_MAPPINGS)
    titles = {n.values["filename_prefix"]: n.display_title for n in wf.nodes if n.class_type == "SaveImage"}
    saved = runner.SaveImage.saved
    return compose([images[0] for _, images in saved], [titles[prefix] for prefix, _ in saved], wf.title)


def compose(images, labels, title, scale: int = 2):
    from PIL import Image, ImageDraw

    pics = []
    for t in images:
        arr = (t.clamp(0, 1).numpy() * 255).round().astype("uint8")
        pic = Image.fromarray(arr)
        pics.append(pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST))
    pad, head, foot = 16, 40, 28
    w = sum(p.width for p in pics) + pad * (len(pics) + 1)
    h = max(p.height for p in pics) + head + foot + pad
    canvas = Image.new("RGB", (max(w, 420), h), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    fonts, full = _fonts()
    font, small = fonts[14], fonts[12]
    draw.text((pad, 12), _drawable(title, full), fill=(235, 235, 235), font=font)
    x = pad
    for pic, label in zip(pics, labels):
        canvas.paste(pic, (x, head))
        draw.text((x, head + pic.height + 6), _drawable(label, full), fill=(190, 190, 190), font=small)
        x += pic.width + pad
    return canvas


TYPE_COLORS = {
    "TWIG_MODEL": (180, 160, 255), "TWIG_TEXT_ENCODER": (255, 210, 90), "TWIG_VAE": (255, 110, 110),
    "TWIG_CONDITIONING": (255, 170, 60), "LATENT": (255, 155, 220), "IMAGE": (100, 180, 230), "STRING": (140, 200, 140),
    "MASK": (100, 220, 120), "INT": (120, 200, 120),
}


def _fonts():
    """DejaVu Sans where the system has it (arrows, superscripts), else Pillow's built-in font."""
    from PIL import ImageFont

    try:
        return {s: ImageFont.truetype("DejaVuSans.ttf", s) for s in (12, 14, 22)}, True
    except OSError:
        return {s: ImageFont.load_default(size=s) for s in (12, 14, 22)}, False


def _drawable(text: str, full: bool) -> str:
    if not full:
        text = text.replace("→", "->").replace("²", "^2").replace("×", "x").replace("—", "-")
    return text


def _wrap(draw, text: str, font, width: float) -> list[str]:
    lines = []
    for para in text.split("\n"):
        words, cur = para.split(" "), ""
        for w in words:
            trial = (cur + " " + w).strip()
            if draw.textlength(trial, font=font) <= width or not cur:
                cur = trial
            else:
                lines.append(cur)
                cur = w
        lines.append(cur)
    return lines


def _shown_text(n: dict) -> str | None:
    """Text worth reading inside a node of the diagram: a note, a prompt, TIPO's tags."""
    if n["type"] == "MarkdownNote":
        text = n["widgets_values"][0]
    elif n["type"] in ("TwigTextEncode", "TwigTIPO"):
        text = n["widgets_values"][0]
        if any(i.get("widget", {}).get("name") == "positive" for i in n["inputs"]):
            return "(positive prompt from TwigTIPO)"
    else:
        return None
    for mark in ("**", "`", "*"):
        text = text.replace(mark, "")
    ascii_only = "".join(ch for ch in text if ord(ch) < 0x2E80)  # the fonts have no CJK glyphs
    if not ascii_only.strip() or len(ascii_only) < len(text) * 0.5:
        return f"(Chinese prompt, {len(text)} characters)"
    return ascii_only


def render_diagram(wf: Workflow):
    """A drawing of the graph (nodes where the workflow puts them, links coloured by type) with its title."""
    from PIL import Image, ImageDraw

    ui = wf.ui()
    nodes = {n["id"]: n for n in ui["nodes"]}
    title_h = 26
    xs = [n["pos"][0] for n in ui["nodes"]] + [n["pos"][0] + n["size"][0] for n in ui["nodes"]]
    ys = [n["pos"][1] - title_h for n in ui["nodes"]] + [n["pos"][1] + n["size"][1] for n in ui["nodes"]]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    scale = min(1.0, 1500 / (x1 - x0))
    margin, head = 24, 84
    W, H = int((x1 - x0) * scale) + 2 * margin, int((y1 - y0) * scale) + 2 * margin + head
    img = Image.new("RGB", (W, H), (30, 30, 30))
    d = ImageDraw.Draw(img)
    fonts, full = _fonts()
    big, font, small = fonts[22], fonts[14], fonts[12]

    def P(x, y):
        return margin + (x - x0) * scale, head + margin + (y - y0) * scale

    def slot_y(n, i):
        return n["pos"][1] + 14 + 22 * i

    for lid, src, sslot, dst, dslot, typ in ui["links"]:
        a, b = nodes[src], nodes[dst]
        p0 = P(a["pos"][0] + a["size"][0], slot_y(a, sslot))
        p1 = P(b["pos"][0], slot_y(b, dslot))
        mid = (p0[0] + p1[0]) / 2
        d.line([p0, (mid, p0[1]), (mid, p1[1]), p1], fill=TYPE_COLORS.get(typ, (200, 200, 200)), width=3, joint="curve")
    for n in ui["nodes"]:
        bx0, by0 = P(n["pos"][0], n["pos"][1] - title_h)
        bx1, by1 = P(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        note = n["type"] == "MarkdownNote"
        d.rounded_rectangle((bx0, by0, bx1, by1), radius=8, fill=(90, 70, 40) if note else (53, 53, 53), outline=(90, 90, 90))
        d.rounded_rectangle((bx0, by0, bx1, by0 + title_h * scale), radius=8, fill=(110, 85, 50) if note else (70, 70, 70))
        name = n.get("title") or node_spec(n["type"])["display_name"]
        d.text((bx0 + 8, by0 + 5 * scale), _drawable(name, full), fill=(230, 230, 230), font=font)
        ty = by0 + title_h * scale + 6
        if not note:
            for i, inp in enumerate(n["inputs"]):
                d.text((bx0 + 10, P(0, slot_y(n, i))[1] - 7), inp["name"], fill=(170, 170, 170), font=small)
            for i, out in enumerate(n["outputs"]):
                tw = d.textlength(out["name"], font=small)
                d.text((bx1 - 10 - tw, P(0, slot_y(n, i))[1] - 7), out["name"], fill=(170, 170, 170), font=small)
            ty = P(0, slot_y(n, max(len(n["inputs"]), len(n["outputs"]))))[1]
        text = _shown_text(n)
        if text is None:
            values = [v for v in n["widgets_values"] if isinstance(v, str) and v and v != CONTROL and len(v) < 48]
            text = "\n".join(v for v in values[:3] if v.isascii())
        for line in _wrap(d, _drawable(text, full), small, bx1 - bx0 - 20):
            if ty + 15 > by1:
                break
            d.text((bx0 + 10, ty), line, fill=(235, 225, 190) if note else (200, 200, 140), font=small)
            ty += 15
    d.text((margin, 14), _drawable(wf.title, full), fill=(240, 240, 240), font=big)
    needs = f"{TWIG}, {GEMMA.rstrip('/')}, {DCAE.rstrip('/')}" + plain(wf.needs)[len(NEEDS_TWIG):]
    why = "the demo model is not in this checkout" if wf.demo else "it needs " + needs
    for i, line in enumerate(_wrap(d, _drawable(f"Workflow diagram, not a render: {why}. Drop this PNG on ComfyUI "
                                                "to load the workflow.", full), small, W - 2 * margin)[:2]):
        d.text((margin, 46 + 16 * i), line, fill=(200, 180, 120), font=small)
    return img


def plain(markdown: str) -> str:
    return markdown.replace("`", "")


# ---------------------------------------------------------------------------------------------------


def expected_files(wfs) -> dict[Path, str]:
    out = {}
    for wf in wfs:
        out[HERE / f"{wf.name}.json"] = dumps(wf.ui())
        out[API_DIR / f"{wf.name}.json"] = dumps(wf.api())
    return out


def readme_table(wfs) -> str:
    """The README's table of workflows (kept equal to this by a test)."""
    rows = ["| workflow | what it does | weights it needs (ComfyUI folders) |", "| --- | --- | --- |"]
    for wf in wfs:
        link = f"[`{wf.name}`](workflows/{wf.name}.json) ([API](workflows/api/{wf.name}.json), [preview](workflows/{wf.name}.png))"
        rows.append(f"| {link} | {wf.summary} | {wf.needs} |")
    return "\n".join(rows) + "\n"


def check(wfs) -> list[str]:
    """Differences between the committed files and what this script writes, and overlapping nodes."""
    problems = [p for wf in wfs for p in overlaps(wf)]
    for path, text in expected_files(wfs).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            problems.append(f"{path.relative_to(ROOT)} is not what workflows/build.py writes")
    for wf in wfs:
        png = HERE / f"{wf.name}.png"
        if not png.is_file():
            problems.append(f"{png.relative_to(ROOT)} is missing")
            continue
        chunks = png_chunks(png)
        if json.loads(chunks.get("workflow", "null")) != wf.ui() or json.loads(chunks.get("prompt", "null")) != wf.api():
            problems.append(f"{png.relative_to(ROOT)} carries an older graph")
        thumb = thumbnail_problem(png)
        if thumb:
            problems.append(thumb)
    known = {f"{wf.name}.json" for wf in wfs}
    for extra in sorted(p.name for p in list(HERE.glob("*.json")) + list(API_DIR.glob("*.json")) if p.name not in known):
        problems.append(f"workflows/{extra} is not made by workflows/build.py")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on differences")
    ap.add_argument("--previews", action="store_true", help="render every PNG preview again")
    ap.add_argument("--readme-table", action="store_true", help="print the README's table of workflows")
    a = ap.parse_args(argv)
    wfs = workflows()
    if a.readme_table:
        print(readme_table(wfs), end="")
        return 0
    if a.check:
        problems = check(wfs)
        for p in problems:
            print(p)
        return 1 if problems else 0
    API_DIR.mkdir(exist_ok=True)
    for path, text in expected_files(wfs).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    demo = demo_dir()
    for wf in wfs:
        png = HERE / f"{wf.name}.png"
        chunks = png_chunks(png) if png.is_file() else {}
        stale = any(key not in chunks or json.loads(chunks[key]) != want
                    for key, want in (("workflow", wf.ui()), ("prompt", wf.api())))
        if not (a.previews or stale):
            if thumbnail_problem(png):
                print(f"wrote {save_thumbnail(png).relative_to(ROOT)} (thumbnail)")
            continue
        if wf.demo and demo is not None:
            image, kind = render_demo(wf), "render on the demo model"
        else:
            image, kind = render_diagram(wf), "diagram"
        save_png(image, png, wf)
        print(f"wrote {png.relative_to(ROOT)} ({kind}) and {save_thumbnail(png).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TWIG_MODELS_DIR", str(ROOT / "models"))
    sys.exit(main())
