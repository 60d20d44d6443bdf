"""Structured output by constrained decoding: JSON schemas and forced tool calls, through llguidance.

llguidance (Microsoft's low-level guidance library) computes, per step, the set of tokens that keep the output
inside a grammar; it is dependency-free, fast (mask in tens of microseconds), and takes any vocabulary given as
token bytes, which covers our tiktoken, SentencePiece and GGUF tokenizers alike.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from .http import APIError


class GrammarConstraint:
    """Masks logits to the tokens a grammar allows next; follows the tokens actually chosen."""

    def __init__(self, lltok, grammar: str, vocab_size: int) -> None:
        import llguidance
        import llguidance.torch as llt

        self._llt = llt
        self._args = (lltok, grammar, vocab_size)
        self.matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise APIError(400, f"the output schema cannot be compiled: {self.matcher.get_error()}",
                           param="response_format")
        self.bitmask = llt.allocate_token_bitmask(1, vocab_size)

    def fresh(self) -> GrammarConstraint:
        """The same grammar from its start: each choice of an n > 1 request follows its own tokens."""
        return GrammarConstraint(*self._args)

    def mask(self, logits: torch.Tensor) -> None:
        """logits: (1, V) float32, masked in place."""
        self._llt.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        self._llt.apply_token_bitmask_inplace(logits, self.bitmask)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


class _Vocab:
    """Our tokenizer in the shape llguidance's TokenizerWrapper reads (specials as 0xFF + literal bytes)."""

    def __init__(self, tokenizer, vocab_size: int, eos: list[int]) -> None:
        specials = {i: name for name, i in (tokenizer.special_tokens or {}).items()}
        tokens = []
        for i in range(vocab_size):
            if i in specials:
                tokens.append(b"\xff" + specials[i].encode())
            else:
                try:
                    tokens.append(tokenizer.token_bytes(i))
                except Exception:  # ids past the tokenizer's table (padded embedding rows)
                    tokens.append(b"\xff<unused_%d>" % i)
        self.tokens = tokens
        self.special_token_ids = sorted(specials)
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_id
        self._tok = tokenizer

    def __call__(self, s):
        return self._tok.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s)


@lru_cache(maxsize=4)
def _lltokenizer(tokenizer, vocab_size: int, eos: tuple[int, ...]):
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tokenizer, vocab_size, list(eos))),
                                  n_vocab=vocab_size, eos_token=list(eos))


def json_constraint(served, schema: dict) -> GrammarConstraint:
    import llguidance

    eos = tuple(sorted(served.stop_ids_default))
    lltok = _lltokenizer(served.tokenizer, served.model.config.vocab_size, eos)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                defaults={"whitespace_flexible": False})
    except Exception as exc:  # an invalid schema is the client's error
        raise APIError(400, f"invalid JSON schema: {exc}", param="response_format") from None
    return GrammarConstraint(lltok, grammar, served.model.config.vocab_size)


def tool_call_schema(tools: list[dict], only: str | None = None) -> dict:
    """Llama 3.1's JSON tool-call shape {"name": ..., "parameters": {...}} for one of `tools`."""
    options = []
    for t in tools:
        fn = t["function"]
        if only is None or fn["name"] == only:
            options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "parameters": fn.get(
                "parameters") or {"type": "object"}}, "required": ["name", "parameters"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def constraint_for_request(served, body) -> GrammarConstraint | None:
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        return json_constraint(served, {"type": "object"})
    if rf is not None and rf.type == "json_schema":
        return json_constraint(served, rf.json_schema["schema"])
    choice = body.tool_choice
    if body.tools and (choice == "required" or isinstance(choice, dict)):
        if served.model.chat_format_name != "llama3":
            raise APIError(400, "tool_choice 'required' or a named tool is enforced for Llama 3.x JSON tool calls "
                                "only; use tool_choice 'auto' with this model", param="tool_choice")
        tools = [t.model_dump() for t in body.tools]
        only = choice["function"]["name"] if isinstance(choice, dict) else None
        if only is not None and only not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {only!r}, which is not among the tools", param="tool_choice")
        return json_constraint(served, tool_call_schema(tools, only))
    return None
