"""Run by tests/test_lora.py in a process of its own (ComfyUI's modules change global state): the real ComfyUI
tree's ModelPatcher with a LoRA given as Twig patches (nodes.lora.patch_native) against twig_core's runtime
adapters on the same weights; unpatching gives the base weights back. Prints the relative error.

Usage: python tests/lora_native_check.py COMFYUI_DIR SCRATCH_DIR LORA_FILE STRENGTH
"""

import os
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
comfy_dir, scratch, lora_path, strength = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
from tests.comfy_host.client import TORCHVISION_STUB  # noqa: E402

for rel, text in TORCHVISION_STUB.items():
    path = os.path.join(scratch, "torchvision", rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
sys.path[1:1] = [scratch, comfy_dir]  # after the pack: ComfyUI has a nodes.py of its own
sys.argv = ["main.py", "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402

from nodes.lora import patch_native  # noqa: E402
from nodes.native import native_model  # noqa: E402
from tests.builders import TINY_TRANSFORMER, tiny_transformer, transformer_inputs  # noqa: E402
from twig_core.lora import apply_loras, read_lora, remove_loras  # noqa: E402

model = tiny_transformer()
x, t, ctx, mask = transformer_inputs(TINY_TRANSFORMER)
base = {k: v.clone() for k, v in model.state_dict().items()}
lora = read_lora(lora_path)
with torch.no_grad():
    plain = model(x, t, ctx, mask)
    apply_loras(model, [(lora, strength)])
    ref = model(x, t, ctx, mask)
    remove_loras(model)
    cpu = torch.device("cpu")
    patcher = patch_native(native_model(model, 3.0, 0.41407, cpu, cpu), [(lora, strength)])
    patcher.patch_model()
    got = patcher.model.diffusion_model(x, t, context=ctx, attention_mask=mask)
    patcher.unpatch_model()
restored = all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
changed = ((got - plain).abs().max() / plain.abs().max()).item()
print(f"rel_err={((got - ref).abs().max() / ref.abs().max()).item():.3e} changed={changed:.3e} restored={restored}")
