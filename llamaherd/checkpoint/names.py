"""Tensor-name tables as data: one placeholder style ("{i}", the layer index) and one rename function."""

from __future__ import annotations


def rename(name: str, table: dict[str, str]) -> str | None:
    """Map one tensor name through `table` ("model.layers.{i}.x" -> "layers.{i}.y"); None when it has no entry.

    The first all-digit part of a name is its layer index, as in every format here (HF `model.layers.7.`,
    Meta `layers.7.`, GGUF `blk.7.`).
    """
    if name in table:
        return table[name]
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            target = table.get(".".join(parts[:k] + ["{i}"] + parts[k + 1 :]))
            return None if target is None else target.replace("{i}", part)
    return None


def invert(table: dict[str, str]) -> dict[str, str]:
    """The table read the other way (canonical -> format); the tables are one to one, checked here."""
    out = {v: k for k, v in table.items()}
    assert len(out) == len(table), "a name table maps two names onto one"
    return out
