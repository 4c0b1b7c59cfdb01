"""The Twig tab, in gradio: the same Blocks in the WebUI (A1111: gradio 3.41, Forge: gradio 4.x) and standalone.

Only components and arguments present in both gradio 3.41 and 4.x are used: Textbox, Button, Gallery,
Slider, Dropdown, Checkbox, Number, HTML, State, Row/Column, ``gr.update``, ``gr.Progress`` and
``.click``/``.change`` with ``queue=False`` for the Interrupt button. Every element the tests touch has an
``elem_id`` starting with ``twig_``.

The gallery gets file paths of PNGs the engine saved itself, so the "parameters" text chunk reaches the
browser (and the WebUI's PNG Info tab) untouched.
"""

from __future__ import annotations

import html
import logging
import traceback

from twig_core.presets import DEFAULT_PRESET, PRESET_NAMES
from twig_core.errors import TwigError
from twig_core.sampling import SAMPLERS
from twig_core.tipo import LENGTHS

from .engine import FROM_MODEL, Engine, Interrupted, Settings, nearest_choice, size_choices
from .host import Host

log = logging.getLogger("twig")

EXAMPLE = "左边一个红色的圆，右边一个蓝色的正方形"
NO_TIPO = "(no TIPO model in models/LLM)"
NO_FACE = "(no face detector installed)"


def _status(text: str, kind: str = "ok") -> str:
    colour = {"ok": "inherit", "error": "#d33", "warn": "#b80"}[kind]
    return (f'<div class="twig-status twig-{kind}" style="color:{colour};white-space:pre-wrap">'
            f"{html.escape(text)}</div>")


def _info(text: str) -> str:
    return f'<pre class="twig-infotext" style="white-space:pre-wrap;margin:0">{html.escape(text)}</pre>'


def _or(choices: list[str], empty: str) -> list[str]:
    return choices or [empty]


def build_ui(engine: Engine | None = None, *, theme=None):
    """The tab as a ``gr.Blocks``. ``engine`` defaults to a standalone one; the WebUI passes its own host."""
    import gradio as gr

    engine = engine or Engine(Host())
    cat = engine.catalog

    def model_names():
        return list(cat.models()) or ["(no Twig model: put one in " + engine.host.folder_hint("model") + ")"]

    models = model_names()
    first_model = models[0]
    sizes = size_choices(engine.native(first_model))
    blocks_kw = {"analytics_enabled": False, "title": "Twig"}
    if theme is not None:
        blocks_kw["theme"] = theme

    with gr.Blocks(**blocks_kw) as ui:
        with gr.Row():
            with gr.Column(scale=4):
                prompt = gr.Textbox(label="Prompt (English or 中文)", lines=3, placeholder=EXAMPLE,
                                    elem_id="twig_prompt")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="twig_negative")
            with gr.Column(scale=1, min_width=160):
                run_btn = gr.Button("Generate", variant="primary", elem_id="twig_generate")
                stop_btn = gr.Button("Interrupt", elem_id="twig_interrupt")
                with gr.Row():
                    tipo = gr.Checkbox(label="TIPO prompt expansion", value=False, elem_id="twig_tipo")
                    face = gr.Checkbox(label="Face refine", value=False, elem_id="twig_face")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    size = gr.Dropdown(label="Size (width x height)", choices=sizes, value=sizes[0],
                                       elem_id="twig_size")
                    sampler = gr.Dropdown(label="Sampler", choices=list(SAMPLERS), value=SAMPLERS[0],
                                          elem_id="twig_sampler")
                steps = gr.Slider(label="Steps", minimum=1, maximum=100, step=1, value=20, elem_id="twig_steps")
                cfg = gr.Slider(label="CFG scale", minimum=1.0, maximum=15.0, step=0.1, value=4.5, elem_id="twig_cfg")
                with gr.Row():
                    seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, elem_id="twig_seed")
                    reuse = gr.Button("Reuse last seed", elem_id="twig_reuse_seed")
                    batch = gr.Slider(label="Batch size", minimum=1, maximum=8, step=1, value=1, elem_id="twig_batch")
                with gr.Row():
                    model = gr.Dropdown(label="Model", choices=models, value=first_model, elem_id="twig_model")
                    refresh = gr.Button("Refresh", elem_id="twig_refresh")
                with gr.Row():
                    tes = list(cat.text_encoders())
                    text_encoder = gr.Dropdown(label="Text encoder (Gemma-2)", choices=tes, value=FROM_MODEL,
                                               elem_id="twig_text_encoder")
                    vaes = list(cat.vaes())
                    vae = gr.Dropdown(label="VAE (DC-AE)", choices=vaes, value=FROM_MODEL, elem_id="twig_vae")
                with gr.Row():
                    dtype = gr.Dropdown(label="Precision", choices=list(PRESET_NAMES), value=DEFAULT_PRESET, elem_id="twig_dtype",
                                        info="quality: fp32; balanced: bf16 where native (fp16 on older GPUs, fp32 on other CPUs); "
                                             "fast: sampler shortcuts, with bf16 on GPUs and AMX CPUs, int8 products on other CPUs")
                    max_length = gr.Slider(label="Max prompt tokens", minimum=100, maximum=1200, step=50, value=300,
                                           elem_id="twig_max_length")
                with gr.Row():
                    tipos = _or(list(cat.tipo_models()), NO_TIPO)
                    tipo_model = gr.Dropdown(label="TIPO model", choices=tipos, value=tipos[0], elem_id="twig_tipo_model")
                    tipo_length = gr.Dropdown(label="TIPO length", choices=list(LENGTHS), value="long",
                                              elem_id="twig_tipo_length")
                with gr.Row():
                    faces = _or(list(cat.face_detectors()), NO_FACE)
                    face_detector = gr.Dropdown(label="Face detector", choices=faces, value=faces[0],
                                                elem_id="twig_face_detector")
                    face_denoise = gr.Slider(label="Face denoise", minimum=0.0, maximum=1.0, step=0.01, value=0.4,
                                             elem_id="twig_face_denoise")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", columns=2, height=512, elem_id="twig_gallery")
                status = gr.HTML(_status("ready"), elem_id="twig_status")
                info = gr.HTML("", elem_id="twig_info")
        last_seed = gr.State(-1)

        def generate(prompt_v, negative_v, tipo_v, tipo_model_v, tipo_length_v, face_v, face_detector_v,
                     face_denoise_v, size_v, steps_v, cfg_v, seed_v, sampler_v, batch_v, model_v, te_v, vae_v, dtype_v, max_length_v,
                     last_seed_v, progress=gr.Progress()):
            settings = Settings(
                prompt=prompt_v or "", negative=negative_v or "", size=size_v or "", steps=int(steps_v),
                cfg=float(cfg_v), seed=int(seed_v) if seed_v is not None else -1, sampler=sampler_v,
                batch_size=int(batch_v), model=model_v or "", text_encoder=te_v or FROM_MODEL, vae=vae_v or FROM_MODEL,
                dtype=dtype_v or DEFAULT_PRESET, max_length=int(max_length_v), tipo=bool(tipo_v),
                tipo_model="" if tipo_model_v == NO_TIPO else (tipo_model_v or ""), tipo_length=tipo_length_v or "long",
                face=bool(face_v),
                face_detector="" if face_detector_v == NO_FACE else (face_detector_v or ""),
                face_denoise=float(face_denoise_v),
            )

            def report(fraction: float, desc: str) -> None:
                progress(min(max(fraction, 0.0), 1.0), desc=desc)

            try:
                result = engine.run(settings, report)
            except Interrupted:
                return gr.update(), gr.update(), _status("Interrupted; nothing was saved.", "warn"), last_seed_v
            except TwigError as e:
                log.warning("[Twig] %s", e)
                return gr.update(), gr.update(), _status(f"Error: {e}", "error"), last_seed_v
            except Exception as e:  # noqa: BLE001 - shown in the tab, with the traceback in the console
                log.error("[Twig] generation failed:\n%s", traceback.format_exc())
                from twig_core.devices import is_out_of_memory

                if is_out_of_memory(e):  # CUDA's OutOfMemoryError, MPS's RuntimeError
                    engine.unload()
                    msg = "out of GPU memory: try a smaller size or batch, or bf16/fp16 precision"
                else:
                    msg = f"unexpected {type(e).__name__}: {e}"
                return gr.update(), gr.update(), _status(f"Error: {msg}", "error"), last_seed_v
            done = f"{len(result.paths)} image(s), {result.width}x{result.height}, seed {result.seed}, " \
                   f"{result.seconds:.1f}s; saved to {result.paths[0]}"
            if result.notes:
                done += "\n" + "\n".join(result.notes)
            return result.paths, _info(result.infotext), _status(done), result.seed

        run_btn.click(
            fn=generate,
            inputs=[prompt, negative, tipo, tipo_model, tipo_length, face, face_detector, face_denoise, size, steps,
                    cfg, seed, sampler, batch, model, text_encoder, vae, dtype, max_length, last_seed],
            outputs=[gallery, info, status, last_seed],
        )
        stop_btn.click(fn=engine.interrupt, inputs=None, outputs=None, queue=False)
        reuse.click(fn=lambda s: s, inputs=[last_seed], outputs=[seed], queue=False)

        def on_model(model_v, size_v):
            choices = size_choices(engine.native(model_v))
            return gr.update(choices=choices, value=nearest_choice(choices, size_v))

        model.change(fn=on_model, inputs=[model, size], outputs=[size], queue=False)

        def on_refresh(model_v, te_v, vae_v, tipo_v, face_v):
            def keep(choices, value):
                return gr.update(choices=choices, value=value if value in choices else choices[0])

            return (keep(model_names(), model_v), keep(list(cat.text_encoders()), te_v),
                    keep(list(cat.vaes()), vae_v), keep(_or(list(cat.tipo_models()), NO_TIPO), tipo_v),
                    keep(_or(list(cat.face_detectors()), NO_FACE), face_v))

        refresh.click(fn=on_refresh, inputs=[model, text_encoder, vae, tipo_model, face_detector],
                      outputs=[model, text_encoder, vae, tipo_model, face_detector], queue=False)
    return ui
