"""Every released model as one row of data, keyed by exact name; each row cites where its numbers come from.

Rows live in per-family modules (`llama.py`, `llama4.py`, ...) and are merged into one table here.
"""

from __future__ import annotations

from ..config import ConfigError, ModelConfig
from ..model import build
from . import gemma3, llama, llama4
from .preset import Preset

FAMILIES = (llama, llama4, gemma3)


def _collect() -> dict[str, Preset]:
    table: dict[str, Preset] = {}
    for module in FAMILIES:
        for preset in module.PRESETS:
            if preset.name in table:
                raise ConfigError(f"preset {preset.name!r} defined twice")
            table[preset.name] = preset
    return table


PRESETS: dict[str, Preset] = _collect()


def get(name: str) -> Preset:
    """The preset of that exact name (case-insensitive); unknown names raise with the list of known ones."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def parse_size(text: str) -> tuple[float, float]:
    """"8.03B" -> (8.03e9, 1e7): the value and one unit of its last written digit."""
    digits = text.rstrip("BM")
    scale = {"B": 1e9, "M": 1e6}[text[-1]]
    decimals = len(digits.partition(".")[2])
    return float(digits) * scale, 10.0**-decimals * scale


def count_parameters(config: ModelConfig) -> tuple[int, int]:
    """(total, active) parameter counts, exact, from the model built on the meta device.

    Active counts each MoE layer's routed experts at top_k / num_experts of their size.
    """
    net = build(config, device="meta")
    total = active = 0
    for name, p in net.named_parameters():
        n = p.numel()
        total += n
        if config.moe is not None and ".experts." in f".{name}.":
            active += n * config.moe.top_k // config.moe.num_experts
        else:
            active += n
    return total, active


__all__ = ["PRESETS", "Preset", "count_parameters", "get"]
