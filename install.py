"""Stable Diffusion WebUI (A1111) / Forge extension installer, run by the WebUI at start-up (``python install.py``).

Installs what ``requirements.txt`` lists and the WebUI's Python lacks. Never installs or upgrades torch, and
never upgrades a package the WebUI already has (the WebUI pins its own versions and would reinstall them at
every start): a version below our lower bound is reported instead, with the command to fix it.
"""

from __future__ import annotations

import os
import re

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")
NEVER = {"torch", "torchvision", "torchaudio", "xformers"}


def requirements(path: str = REQUIREMENTS) -> list[tuple[str, str, str]]:
    """(name, lower bound or "", the requirement line) for each entry of a requirements file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?", line)
            if not line or line.startswith("-") or not m:
                continue
            out.append((m.group(1), m.group(2) or "", line))
    return out


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def installed_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(reqs, version_of=installed_version) -> tuple[list[str], list[str]]:
    """(lines to pip install, warnings about versions that are too old)."""
    install, warnings = [], []
    for name, bound, line in reqs:
        if name.lower() in NEVER:
            continue
        have = version_of(name)
        if have is None:
            install.append(line)
        elif bound and _version_tuple(have) < _version_tuple(bound):
            warnings.append(f"[Twig] {name} {have} is installed; Twig needs {name}>={bound}. "
                            f"Upgrade it in the WebUI's Python (pip install \"{line}\") if the Twig tab reports it.")
    return install, warnings


def main() -> None:
    try:
        import launch
    except ImportError:  # run by another host (ComfyUI-Manager also runs install.py), which installs requirements.txt
        print("[Twig] install.py: not inside Stable Diffusion WebUI; nothing to do here")
        return

    install, warnings = plan(requirements(), lambda n: installed_version(n) if launch.is_installed(n) else None)
    for line in install:
        launch.run_pip(f'install "{line}"', f"Twig requirement: {line}")
    for w in warnings:
        print(w)


if __name__ == "__main__":  # the WebUI runs it as a script, with its own folder on PYTHONPATH
    main()
