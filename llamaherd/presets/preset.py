"""One preset row: a released model's configuration, where its numbers come from, and its published size."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class Preset:
    name: str  # exact, lower-case, e.g. "llama-3.1-8b-instruct"
    config: ModelConfig
    source: str  # where the numbers come from: params.json / config.json of the release
    published_params: str  # the size the release announces, as written there: "8.03B", "406B"
    published_active_params: str | None = None  # MoE models: parameters used per token, e.g. "17B"
    chat_format: str | None = None  # "llama2", "llama3", "llama4", ... for instruct models
    notes: str = ""
    # Parameters the published size counts that this row's model does not build (Llama 4: the vision tower
    # and projector of a multimodal release whose text decoder is the row); added before comparing sizes.
    unbuilt_params: int = 0
