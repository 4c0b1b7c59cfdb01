"""The command line writes a PNG with its parameters, from user-style model files, and reports bad input."""

import json

import pytest
from PIL import Image

from tests.builders import write_model_folders
from twig_core.__main__ import main


def test_generate_writes_png_with_parameters(tmp_path, capsys):
    names = write_model_folders(tmp_path / "models")
    m = tmp_path / "models"
    out = tmp_path / "out" / "pic.png"
    args = ["generate", "--prompt", "左边一个红色的圆，右边一个蓝色的正方形", "--negative", "blurry", "--steps", "2",
            "--seed", "3", "--width", "96", "--height", "64", "--batch", "2",
            "--transformer", str(m / "diffusion_models" / names["model"]),
            "--text-encoder", str(m / "text_encoders" / names["text_encoder"]),
            "--vae", str(m / "vae" / names["vae"]), "--out", str(out)]
    assert main(args) == 0
    pic = Image.open(out)
    assert pic.size == (96, 64)
    params = pic.text["parameters"]
    assert "左边一个红色的圆" in params and "Negative prompt: blurry" in params and "Seed: 3" in params
    assert (tmp_path / "out" / "pic_1.png").exists()
    # image to image from the picture just written
    out2 = tmp_path / "out" / "again.png"
    assert main(args[:-2] + ["--image", str(out), "--denoise", "0.5", "--batch", "1", "--out", str(out2)]) == 0
    assert Image.open(out2).size == (96, 64)


def test_bad_size_and_missing_file_are_reported(tmp_path, capsys):
    names = write_model_folders(tmp_path / "models")
    m = tmp_path / "models"
    base = ["generate", "--prompt", "x", "--steps", "1", "--transformer", str(m / "diffusion_models" / names["model"]),
            "--text-encoder", str(m / "text_encoders" / names["text_encoder"]), "--vae", str(m / "vae" / names["vae"]),
            "--out", str(tmp_path / "x.png")]
    assert main(base + ["--width", "100", "--height", "64"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    missing = [str(tmp_path / "nope.safetensors") if a.endswith(names["vae"]) else a for a in base]
    assert main(missing + ["--width", "64", "--height", "64"]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_long_prompt_truncation_is_reported_without_the_tokenizer_warning(tmp_path, capfd):
    names = write_model_folders(tmp_path / "models")
    m = tmp_path / "models"
    # as in the demo model's tokenizer: transformers warns about any longer text it tokenizes untruncated
    config = m / "text_encoders" / names["text_encoder"] / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 300}))
    long_prompt = " ".join(["a red circle on the left and a blue square on the right"] * 30)  # 810 tokens
    base = ["generate", "--prompt", long_prompt, "--steps", "1", "--width", "64", "--height", "64",
            "--transformer", str(m / "diffusion_models" / names["model"]),
            "--text-encoder", str(m / "text_encoders" / names["text_encoder"]), "--vae", str(m / "vae" / names["vae"]),
            "--out", str(tmp_path / "x.png")]
    assert main(base + ["--max-length", "300"]) == 0
    err = capfd.readouterr().err
    assert "warning: prompt has " in err and "fit in 300;" in err and "dropped from the end" in err
    assert "Token indices sequence length" not in err
    assert main(base + ["--max-length", "1200"]) == 0
    err = capfd.readouterr().err
    assert "Token indices sequence length" not in err
    assert "warning: prompt has" not in err


@pytest.mark.parametrize("option, words", [
    (["--cfg", "-1"], "cfg must be between 0 and 30, got -1.0"),
    (["--cfg", "nan"], "cfg must be between 0 and 30"),
    (["--steps", "0"], "steps must be a whole number 1 … 200"),
    (["--shift", "0"], "shift must be > 0"),
    (["--image", "in.png", "--denoise", "1.5"], "denoise must be in (0, 1]"),
    (["--max-length", "5000"], "max_length must be between 2 and 1200"),
    (["--seed", "-1"], "seed must be a whole number 0 … 18446744073709551615, got -1"),
    (["--seed", str(2**64)], "seed must be a whole number 0 …"),
])
def test_out_of_range_settings_are_refused_before_loading(tmp_path, capsys, option, words):
    # no model is given: the settings are refused before the demo model would load
    assert main(["generate", "--prompt", "x", "--transformer", str(tmp_path / "absent"), *option]) == 2
    assert words in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a cat\n")
    if option[0] not in ("--image",):
        assert main(["batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                     "--transformer", str(tmp_path / "absent"), *option]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.parametrize("package, words", [("twig_core", "{generate,batch,convert}"), ("twig_webui", "--models-dir")])
def test_package_folder_runs_as_a_script_from_any_folder(tmp_path, package, words):
    """``python /path/to/pack/twig_core --help`` from elsewhere: no package and no pack root on sys.path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for target in (root / package, root / package / "__main__.py"):
        done = subprocess.run([sys.executable, str(target), "--help"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert words in done.stdout


def test_webui_folder_runs_as_a_script_from_any_folder(tmp_path):
    """``python /path/to/pack/twig_webui`` gets past its own imports (gradio stubbed: the first use of it stops)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stub = tmp_path / "stub" / "gradio"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("def __getattr__(name):\n    raise SystemExit(f'stub gradio: {name}')\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(tmp_path / "stub")}
    done = subprocess.run([sys.executable, str(root / "twig_webui"), "--models-dir", str(tmp_path / "models"),
                           "--outdir", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "stub gradio: " in done.stderr and "Error" not in done.stderr, done.stderr


def test_lora_option_and_batch_rows_apply_loras_and_record_them(tmp_path, capsys):
    import torch

    from tests.builders import write_tiny_lora

    names = write_model_folders(tmp_path / "models")
    m = tmp_path / "models"
    a = write_tiny_lora(tmp_path / "loras" / "style_a.safetensors", seed=1)
    write_tiny_lora(tmp_path / "loras" / "style_b.safetensors", seed=2)
    models = ["--steps", "2", "--seed", "3", "--width", "64", "--height", "64",
              "--transformer", str(m / "diffusion_models" / names["model"]),
              "--text-encoder", str(m / "text_encoders" / names["text_encoder"]), "--vae", str(m / "vae" / names["vae"])]

    def pixels(path):
        return torch.tensor(list(Image.open(path).getdata()))

    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    assert main(["generate", "--prompt", "a red circle", *models, "--out", str(plain)]) == 0
    assert main(["generate", "--prompt", "a red circle", *models, "--lora", f"{a}:0.7",
                 "--lora", str(tmp_path / "loras" / "style_b.safetensors"), "--out", str(styled)]) == 0
    assert "LoRA: style_a:0.7; style_b:1" in Image.open(styled).text["parameters"]
    assert "LoRA" not in Image.open(plain).text["parameters"]
    assert not torch.equal(pixels(plain), pixels(styled))
    # batch rows: a row's loras (relative to the prompt file), the others as the command says (none here)
    rows = tmp_path / "loras" / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a red circle", "seed": 3, "name": "styled", "loras": ["style_a.safetensors:0.7", ["style_b.safetensors", 1]]})
                    + "\n" + json.dumps({"prompt": "a red circle", "seed": 3, "name": "plain"}) + "\n", encoding="utf-8")
    out = tmp_path / "batch"
    assert main(["batch", str(rows), "--out", str(out), *models]) == 0
    assert "LoRA: style_a:0.7; style_b:1" in Image.open(out / "styled.png").text["parameters"]
    assert torch.equal(pixels(out / "styled.png"), pixels(styled))
    assert torch.equal(pixels(out / "plain.png"), pixels(plain))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["loras"] for r in manifest] == [[["style_a.safetensors", 0.7], ["style_b.safetensors", 1.0]], []]
