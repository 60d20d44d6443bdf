"""Llama 4 chat format: `<|header_start|>role<|header_end|>\\n\\n content <|eot|>`; tool turns end with `<|eom|>`.

Follows llama-models `llama4/chat_format.py::ChatFormat.encode_message`: an assistant message that calls
tools and every tool result end with `<|eom|>`; calls are written without `<|python_start|>` (the
model's own `<|python_start|>...<|python_end|>` output is understood by `parse_assistant`). The default
tool-call style is pythonic (`[f(a=1)]`), Llama 4's documented zero-shot format.
"""

from __future__ import annotations

from .base import S, Segment
from .llama3 import HeaderChatFormat
from .tools import LLAMA4_SYNTAX


class Llama4Format(HeaderChatFormat):
    """Llama 4 Scout / Maverick instruct models."""

    name = "llama4"
    HEADER_START = "<|header_start|>"
    HEADER_END = "<|header_end|>"
    EOT = "<|eot|>"
    EOM = "<|eom|>"
    default_tool_format = "python_list"
    syntax = LLAMA4_SYNTAX
    stop_literals = ("<|eot|>", "<|eom|>", "<|end_of_text|>")
    takes_images = True
    image_max_tiles = 16  # llama-models llama4/chat_format.py max_num_chunks

    def __init__(self, tokenizer, tool_format: str | None = None, today=None, images: bool = False,
                 image_tile: int = 336, image_patch_tokens: int = 144) -> None:
        super().__init__(tokenizer, tool_format, today, images)
        # Tiles of 336 pixels, 144 <|patch|> tokens each: Scout's and Maverick's vision_args (a loaded model
        # passes its own).
        self.image_tile, self.image_patch_tokens = image_tile, image_patch_tokens

    def image_segments(self, part) -> list[Segment]:
        """The image's tile layout (llama-models llama4/chat_format.py `_encode_image`), from its size alone."""
        from ..image import best_canvas, image_source, llama4_image_layout, load_image

        w, h = load_image(image_source(part)).size
        canvas_w, canvas_h = best_canvas(w, h, self.image_max_tiles, self.image_tile)
        grid = (canvas_h // self.image_tile, canvas_w // self.image_tile)
        n = grid[0] * grid[1]
        return [S(t) for t in llama4_image_layout(grid, n + 1 if n > 1 else n, self.image_patch_tokens)]

    def end_token(self, m: dict, calls) -> str:
        if m["role"] in ("tool", "ipython"):
            return self.EOM
        if m["role"] == "assistant" and calls:  # the reference ends every calling turn with <|eom|>
            return self.EOM
        return super().end_token(m, calls)
