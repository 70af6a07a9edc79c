"""The shipped presets: YAML configs installed with the package (``latentlm/configs``).

``--config`` takes a path or a preset name (``ponder/tiny``, ``cocomix/cocomix-69m``; a leading
``configs/`` and the ``.yaml`` suffix are optional), and ``latentlm configs`` lists them with the
first line of each file's header comment.
"""
from __future__ import annotations

from pathlib import Path

from .errors import LatentLMError

PRESET_DIR = Path(__file__).parent / "configs"


def preset_names() -> list[str]:
    """Every shipped preset, as the name ``--config`` accepts (``ponder/tiny``)."""
    return sorted(p.relative_to(PRESET_DIR).with_suffix("").as_posix() for p in PRESET_DIR.rglob("*.yaml"))


def preset_summary(name: str) -> str:
    """The first line of the preset's header comment (what it is), or '' when it has none."""
    for line in (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def preset_name(spec: str) -> str:
    """``spec`` as a preset name: without a leading ``configs/`` and the ``.yaml``/``.yml`` suffix."""
    name = spec.replace("\\", "/")
    for prefix in ("./", "configs/"):
        name = name.removeprefix(prefix)
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name


def config_path(spec: str | Path) -> Path:
    """The YAML file that ``--config spec`` means: an existing path, else the shipped preset of that
    name. Neither: a one-line error pointing at ``latentlm configs``."""
    p = Path(spec)
    if p.is_file():
        return p
    if p.is_dir():
        raise LatentLMError(f"config {spec} is a directory; pass a YAML file or a preset name "
                            "(`latentlm configs` lists them)")
    candidate = PRESET_DIR / f"{preset_name(str(spec))}.yaml"
    if candidate.is_file():
        return candidate
    raise LatentLMError(f"config file {spec} does not exist and no preset has that name; `latentlm configs` "
                        "lists the presets (e.g. --config ponder/tiny)")
