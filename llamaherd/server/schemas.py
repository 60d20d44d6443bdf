"""Request bodies of the OpenAI- and Ollama-compatible APIs (pydantic): validated, unknown fields ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Upper bounds that keep one request from monopolising the server; each 400 names the field.
MAX_TOKENS_LIMIT = 1 << 20
MAX_N = 16


class _Body(BaseModel):
    # Unknown fields are accepted and ignored (OpenAI clients send many); NaN and infinity are rejected.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type", "object") != "object":
            raise ValueError("function parameters must be a JSON schema of type 'object'")
        return v


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and not isinstance((self.json_schema or {}).get("schema"), dict):
            raise ValueError("response_format json_schema needs json_schema.schema (an object)")
        return self


class _Sampling(_Body):
    """Sampling fields shared by /v1/chat/completions and /v1/completions (plus vLLM-style extras)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    typical_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # torch.Generator's range
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # llamaherd's own field: false turns the server's speculative decoding (serve --speculative/--draft) off
    # for this request; true leaves the server's setting
    speculative: bool = True

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop must be at most 16 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if isinstance(v, str) and v not in ("none", "auto", "required"):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', ...}")
        if isinstance(v, dict) and not isinstance((v.get("function") or {}).get("name"), str):
            raise ValueError("a named tool_choice needs function.name")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


class OllamaOptions(_Body):
    # Ollama sets no upper bound; past 100 the distribution is uniform to float precision: a mistake, refused.
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    typical_p: float | None = Field(default=None, gt=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # torch.Generator's range
    stop: list[str] | None = None
    num_predict: int | None = Field(default=None, ge=-2, le=MAX_TOKENS_LIMIT)
    num_ctx: int | None = Field(default=None, ge=1)
    speculative: bool = True  # llamaherd's own: false turns the server's speculative decoding off for this request


class OllamaGenerateRequest(_Body):
    model: str | None = None
    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None  # refused until the engine serves images (never dropped silently)
    raw: bool = False
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = None


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    images: list[str] | None = None


class OllamaChatRequest(_Body):
    model: str | None = None
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Tool] | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = None


class OllamaShowRequest(_Body):
    model: str | None = None
    name: str | None = None


class TokenizeRequest(_Body):
    # llama.cpp sends "content", vLLM "prompt"; both accepted.
    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    add_special: bool | None = None
    add_special_tokens: bool | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
