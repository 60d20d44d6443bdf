"""Timing and token counts of one generation, printed like Ollama's `--verbose` block."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    load_seconds: float = 0.0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    eval_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return self.load_seconds + self.prompt_seconds + self.eval_seconds

    @property
    def prompt_rate(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def eval_rate(self) -> float:
        return self.generated_tokens / self.eval_seconds if self.eval_seconds > 0 else 0.0

    def format(self) -> str:
        """The block Ollama prints after `ollama run --verbose` (same labels, same units)."""
        rows = [
            ("total duration", _dur(self.total_seconds)),
            ("load duration", _dur(self.load_seconds)),
            ("prompt eval count", f"{self.prompt_tokens} token(s)"),
            ("prompt eval duration", _dur(self.prompt_seconds)),
            ("prompt eval rate", f"{self.prompt_rate:.2f} tokens/s"),
            ("eval count", f"{self.generated_tokens} token(s)"),
            ("eval duration", _dur(self.eval_seconds)),
            ("eval rate", f"{self.eval_rate:.2f} tokens/s"),
        ]
        return "\n".join(f"{label + ':':<22}{value}" for label, value in rows)


def _dur(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.6f}s"
    return f"{seconds * 1000:.6f}ms"
