"""The user-facing entry point: `load` a source into a `Model` (network, configuration, tokenizer, defaults)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, materialize, read
from .checkpoint.quantized import holds_fp8, keep_fp8
from .config import GenerationDefaults, ModelConfig
from .errors import ChatFormatError, ContextLengthError, ImageError, TokenizerError
from .native import swaps as native_swaps
from .quant.fp8_mm import cuda_fp8, quantize as fp8_quantize
from .store import resolve_name


def resolve(source: str | Path) -> Path:
    """A path as given, or a model name looked up in the local store."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    return resolve_name(str(source))


def load(source: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
         quantize: str | None = None, adapter: str | Path | None = None, max_memory: int | str | None = None,
         num_ctx: int | None = None) -> Model:
    """Load a model from a Meta folder, a Hugging Face folder, a .gguf file, or a name in the local store.

    `quantize` ("int8", "int4", "int4-g32"/"-g64"/"-g128") makes the projections weight-only quantized
    (quant/weight_only.py); "fp8" runs them as e4m3 codes through `torch._scaled_mm` (quant/fp8_mm.py): an FP8
    checkpoint's own codes, or a float model's projections quantized per channel. On a CUDA device with FP8
    tensor cores an FP8 checkpoint runs that way by default; elsewhere it is dequantised to its float dtype.
    `adapter` is a PEFT-format LoRA folder (adapter_config.json + adapter_model.safetensors) applied on top.
    Before any weight is touched, the memory plan (memory.py) is checked: with `max_memory` (bytes, or "8G"),
    weights + KV cache for `num_ctx` tokens (default: the model's max_seq_len) + working buffers must fit it;
    without, the weights must fit the memory available. Either failure raises `MemoryPlanError` with the numbers.
    """
    ckpt = read(resolve(source))
    if quantize is not None:
        _check_quantizable(ckpt, quantize)
    kept_fp8 = holds_fp8(ckpt) and (quantize == "fp8" or (quantize is None and cuda_fp8(device)))
    if kept_fp8:
        ckpt = keep_fp8(ckpt)  # the file's own e4m3 codes, run by torch._scaled_mm
    memory_plan = None
    if device is None or torch.device(device).type == "cpu":  # the plan counts this process's memory
        from .memory import check_fits

        memory_plan = check_fits(ckpt, max_memory, num_ctx=num_ctx, dtype=dtype, quantize=quantize)
    net = materialize(ckpt, dtype=dtype, device=device)
    if kept_fp8 or quantize == "fp8":
        if not kept_fp8:  # a float model (or block-scaled FP8 file): its projections quantized per channel
            fp8_quantize(net)
        if device is not None:
            net.to(device)  # the FP8 modules' codes are buffers outside the state dict materialize moved
    elif quantize is not None:
        from .quant.weight_only import quantize as quantize_weights  # a swap over the built model

        quantize_weights(net, quantize)
    native_swaps.apply(net)  # the fast CPU paths, as module swaps over the reference model (native/swaps.py)
    if adapter is not None:
        from .lora.peft import load_adapter  # LoRA wraps the projections: a swap like the ones above

        load_adapter(net, ckpt.config, adapter)
    model = Model(net, ckpt)
    model.memory_plan = memory_plan  # what was planned (memory.MemoryPlan), None off the CPU
    return model


def _check_quantizable(ckpt: Checkpoint, quantize: str) -> None:
    """`quantize=` makes float projections int8 / int4 / fp8: a GGUF file's are already quantized, and would stay
    so (say it, rather than load them unchanged)."""
    from .quant.ggml import GGMLWeight

    packed = sorted({t.qtype.name for t in ckpt.state_dict.values() if isinstance(t, GGMLWeight)})
    if packed:
        from .quant.weight_only import QuantizeError

        raise QuantizeError(f"{Path(ckpt.source).name} is already quantized ({'/'.join(packed)} GGUF tensors), so "
                            f"quantize={quantize!r} has nothing to do; run it as it is, or load a float checkpoint "
                            "(Meta, Hugging Face, or an F16/BF16/F32 GGUF)")


class Model:
    """A loaded model. Build one with `llamaherd.load(source)`."""

    def __init__(self, net: nn.Module, checkpoint: Checkpoint) -> None:
        self.net = net
        self.checkpoint = checkpoint
        self.memory_plan = None  # set by `load`: the memory plan checked before loading (llamaherd/memory.py)

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    @property
    def generation_defaults(self) -> GenerationDefaults:
        return self.checkpoint.generation

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
               images: Sequence[Any] | None = None) -> torch.Tensor:
        """Full forward from position 0 without a cache: float32 logits [..., T, vocab].

        A flat sequence gives (T, vocab); a batch of equal-length sequences gives (B, T, vocab). `images`
        (paths, bytes, data: URLs or PIL images; vision models, one flat sequence) stand for the prompt's
        `<|image|>` tokens in order.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        flat = ids.dim() == 1
        if images and not flat:
            raise ImageError("images go with one token sequence, not a batch; call logits once per prompt")
        net = self._with_images(ids.tolist(), images) if flat else self.net
        out = net(ids[None] if flat else ids)
        return out[0] if flat else out

    def _with_images(self, ids: list[int], images: Sequence[Any] | None) -> nn.Module:
        """The network, with a request's images encoded once and bound to it when there are any
        (llamaherd/vision_inputs.py); images for a text-only model raise ImageError."""
        if not images:
            return self.net
        from .vision_inputs import bind_images

        return bind_images(self.net, self.tokenizer, ids, list(images))

    # -- generation (engine/generate.py does the work) -------------------------------------------------------

    def sampling_params(self, **sampling: Any):
        """`SamplingParams` from keyword arguments over this checkpoint's generation defaults."""
        from .engine.sampling import SamplingParams

        return SamplingParams.from_kwargs(self.generation_defaults, **sampling)

    def context_limit(self, num_ctx: int | None = None) -> int:
        """The context window: the user's num_ctx, at most the model's trained max_seq_len."""
        limit = self.config.max_seq_len
        if num_ctx is None:
            return limit
        if not isinstance(num_ctx, int) or num_ctx <= 0 or num_ctx > limit:
            raise ContextLengthError(f"num_ctx={num_ctx!r}: must be a positive integer no larger than this "
                                     f"model's context window max_seq_len={limit}")
        return num_ctx

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """A str is encoded with the tokenizer's BOS token in front (as llama.cpp does); ids are taken as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ChatFormatError(f"{self.checkpoint.source}: this checkpoint has no tokenizer; "
                                      "pass the prompt as a list of token ids")
            return self.tokenizer.encode(prompt, bos=self.tokenizer.bos_id is not None)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise TokenizerError(f"prompt token id {bad[0]} is outside this model's vocabulary "
                                 f"[0, {self.config.vocab_size}); the ids come from another tokenizer")
        return ids

    def _run_setup(self, sampling: dict[str, Any], extra_stop: Sequence[int] = ()):
        from .engine.sampling import make_sampler, resolve_stop_ids

        num_ctx = sampling.pop("num_ctx", None)
        params = self.sampling_params(**sampling)
        sampler = make_sampler(params, self.config.vocab_size, self.device)
        stop_ids = resolve_stop_ids(params, self.tokenizer, self.generation_defaults, extra=extra_stop)
        return sampler, stop_ids, self.context_limit(num_ctx)

    def _speculation(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """Pop the speculative-decoding keywords (`draft=MODEL_OR_PATH`, `speculative="ngram"`,
        `num_speculative_tokens=k`) into the engine's arguments; {} when speculation is not asked for."""
        from .engine.speculative import make_proposer

        draft = sampling.pop("draft", None)
        mode = sampling.pop("speculative", None)
        k = sampling.pop("num_speculative_tokens", None)
        if draft is not None and not isinstance(draft, Model):
            draft = load(draft, device=self.device)
        from .vision_inputs import placeholder_ids

        proposer = make_proposer(mode, draft.net if draft is not None else None, self.config.vocab_size,
                                 placeholder_ids(self.tokenizer))
        if proposer is None:
            return {}
        return {"proposer": proposer, "num_speculative_tokens": 5 if k is None else k}

    def complete(self, prompt: str | Sequence[int], *, stats=None, extra_stop_ids: Sequence[int] = (),
                 images: Sequence[Any] | None = None, **sampling: Any):
        """One completion with everything known about it: text, token ids, finish reason, logprobs, stats.
        `images` stand for the prompt's image tokens, in order (vision models)."""
        from .engine.generate import complete

        spec = self._speculation(sampling)
        sampler, stop_ids, limit = self._run_setup(sampling, extra_stop_ids)
        ids = self.encode_prompt(prompt)
        return complete(self._with_images(ids, images), self.tokenizer, ids, sampler, stop_ids=stop_ids,
                        context_limit=limit, stats=stats, **spec)

    def generate(self, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], stream: bool = False,
                 *, stats=None, skip_special_tokens: bool = False, images: Sequence[Any] | None = None,
                 **sampling: Any) -> str | list[str] | Iterator[str]:
        """Continue `prompt` (text, or token ids); with stream=True yield pieces of valid UTF-8 text as they come.

        A list of prompts (texts or id lists) runs as one left-padded batch and returns one text per prompt.
        Sampling keywords are `SamplingParams` fields (temperature, top_k, top_p, min_p, typical_p,
        repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed, stop, stop_token_ids,
        max_tokens, ...), defaulting to the checkpoint's generation config; `num_ctx` narrows the context window.
        Prompts longer than the window raise `ContextLengthError`; nothing is truncated.
        With stream=True, `skip_special_tokens` leaves control tokens out of the pieces (as llama.cpp's output).
        `images` (vision models, one prompt) stand for the prompt's `<|image|>` tokens, in order.
        Speculative decoding, with the same output distribution: `draft=MODEL_OR_PATH` (a smaller model with this
        tokenizer) or `speculative="ngram"` (prompt lookup), proposing `num_speculative_tokens` (default 5).
        """
        if _is_batch(prompt):
            if images:
                raise ImageError("images go with one prompt, not a batch; call generate once per prompt")
            if sampling.get("draft") is not None or sampling.get("speculative") is not None:
                raise ValueError("speculative decoding takes one prompt; call generate once per prompt")
            if stream:
                raise ValueError("stream=True takes one prompt; call generate once per prompt to stream several")
            from .engine.generate import complete_batch

            sampler, stop_ids, limit = self._run_setup(sampling)
            ids = [self.encode_prompt(p) for p in prompt]
            return [c.text for c in complete_batch(self.net, self.tokenizer, ids, sampler, stop_ids=stop_ids,
                                                   context_limit=limit)]
        if not stream:
            return self.complete(prompt, stats=stats, images=images, **sampling).text
        from .engine.generate import stream as stream_pieces
        from .engine.step import check_context

        spec = self._speculation(sampling)
        sampler, stop_ids, limit = self._run_setup(sampling)
        ids = self.encode_prompt(prompt)
        check_context(len(ids), limit)  # now, not at the first next() of the stream
        net = self._with_images(ids, images)
        return (p.text for p in stream_pieces(net, self.tokenizer, ids, sampler, stop_ids=stop_ids,
                                               context_limit=limit, stats=stats, skip_special=skip_special_tokens,
                                               **spec)
                if p.text)

    # -- chat ---------------------------------------------------------------------------------------------------

    @property
    def chat_format_name(self) -> str:
        return chat_format_name(self.checkpoint)

    @property
    def has_chat_format(self) -> bool:
        """False for models that cannot chat: no chat template and no built-in format for their architecture."""
        try:
            chat_format_name(self.checkpoint)
        except ChatFormatError:
            return False
        return True

    @property
    def chat_format_choice(self):
        """The chat format and why (`llamaherd.chat.FormatChoice`): `builtin` when inferred, not carried."""
        return chat_format_choice(self.checkpoint)

    def chat_format(self, images: bool = False):
        """The model's chat format; `images=True` (a vision model) renders image parts, for callers that bind
        the images to the model as `chat` does."""
        from .chat import get_format
        from .config import Llama4VisionConfig

        options = {}
        v = self.config.vision
        if images and v is None:
            raise ImageError("this model reads no images (text-only); remove the image or load a vision model")
        if images:
            options["images"] = True
        if self.chat_format_name == "llama4" and isinstance(v, Llama4VisionConfig):  # image layout of this model
            options.update(image_tile=v.image_size, image_patch_tokens=v.tokens_per_tile)
        return get_format(self.chat_format_name, self.tokenizer, template=self.checkpoint.chat_template, **options)

    def chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, stream: bool = False, *,
             stats=None, **sampling: Any) -> dict | Iterator[str]:
        """Answer a conversation (OpenAI-shaped messages) in the model's own chat format.

        Returns the assistant message as an OpenAI-shaped dict, tool calls parsed into `tool_calls`;
        with stream=True yields the reply's text pieces instead. A conversation longer than the context
        window raises `ContextLengthError` (see README, "Context policy").
        """
        from .vision_inputs import message_images

        images = message_images(list(messages))  # image parts (image_url / image), in the order of their tokens
        fmt = self.chat_format(images=bool(images))
        ids = fmt.encode_dialog(list(messages), tools=list(tools) if tools else None, add_generation_prompt=True)
        if stream:
            from .engine.generate import stream as stream_pieces
            from .engine.step import check_context

            spec = self._speculation(sampling)
            sampler, stop_ids, limit = self._run_setup(sampling, fmt.stop_ids)
            check_context(len(ids), limit)
            net = self._with_images(ids, images)
            return (p.text for p in stream_pieces(net, self.tokenizer, ids, sampler, stop_ids=stop_ids,
                                                   context_limit=limit, stats=stats, **spec) if p.text)
        done = self.complete(ids, stats=stats, extra_stop_ids=fmt.stop_ids, images=images, **sampling)
        text = done.text
        if done.stop_token is not None and self.tokenizer is not None:
            # The end token tells end-of-turn from end-of-message (<|eot_id|> vs <|eom_id|> after a tool call).
            text += self.tokenizer.decode([done.stop_token])
        return fmt.parse_assistant(text)

    # -- embeddings ---------------------------------------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], *, normalize: bool = True) -> torch.Tensor:
        """Embeddings of texts: float32 (N, dim), or (dim,) for one str. Each is the mean of the final hidden
        states (after the output norm) over the text's tokens, BOS included, L2-normalised, as llama.cpp's
        `--pooling mean`. A text longer than the context window raises ContextLengthError."""
        from .engine.embedding import embed

        one = isinstance(texts, str)
        ids = [self.encode_prompt(t) for t in ([texts] if one else list(texts))]
        out = embed(self.net, ids, self.config.max_seq_len, normalize=normalize)
        return out[0] if one else out

    def __repr__(self) -> str:
        c = self.config
        return f"Model(arch={c.arch!r}, dim={c.dim}, n_layers={c.n_layers}, source={str(self.checkpoint.source)!r})"


def _is_batch(prompt) -> bool:
    return not isinstance(prompt, (str, torch.Tensor)) and len(prompt) > 0 and \
        all(isinstance(p, str) or (isinstance(p, Sequence) and not isinstance(p, (str, bytes))) for p in prompt)


def chat_format_choice(ckpt: Checkpoint):
    """Which chat format a checkpoint speaks (`llamaherd.chat.choose_format`): explicit metadata
    (`metadata["chat_format"]`, what `--chat-format` sets), Llama 3/4 header tokens, the checkpoint's own
    template, else a format built in for its architecture and vocabulary."""
    from .chat import choose_format

    explicit = ckpt.metadata.get("chat_format") if ckpt.metadata else None
    return choose_format(ckpt.config.arch, ckpt.tokenizer, ckpt.chat_template, explicit)


def chat_format_name(ckpt: Checkpoint) -> str:
    """The name of the chat format a checkpoint speaks (see `chat_format_choice`)."""
    return chat_format_choice(ckpt).name
