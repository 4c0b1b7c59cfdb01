"""Twig engine: Sana-family text-to-image models in plain PyTorch, with no host (ComfyUI, WebUI) or diffusers code.

Where things are: ``loader`` (every checkpoint layout), ``catalog`` (model files and the embedded demo model),
``devices`` (device and dtype rules), ``pipeline`` (prompt to image), ``sampling`` (the sampler table),
``dcae_exec`` (how the DC-AE runs on each device), ``batch`` (prompt files, torchrun).
"""
