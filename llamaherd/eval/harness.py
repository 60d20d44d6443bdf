"""lm-evaluation-harness backend: `--model llamaherd --model_args pretrained=PATH` scores tasks on `llamaherd.load`.

lm-eval finds models in its own registry only (lm_eval 0.4: no plugin discovery), so importing this module
registers the backend: from Python, `import llamaherd.eval.harness` then `lm_eval.simple_evaluate(model=
"llamaherd", model_args="pretrained=PATH")`; from the shell, `python -m llamaherd.eval.harness ARGS` takes
`lm_eval`'s own arguments (`--model llamaherd --model_args pretrained=PATH,max_length=2048 --tasks ...`).

Scoring follows lm-eval's HFLM (lm_eval/models/huggingface.py `_loglikelihood_tokens`): context + continuation,
cut on the left to max_length + 1 tokens, one forward, the continuation's log-probabilities summed and whether
each is the argmax. Text is encoded with BOS in front when the vocabulary has one (`add_bos_token`, as
llama.cpp and lm-eval's Gemma default do). Requests run in right-padded batches of `batch_size`, longest first:
causal attention keeps the real positions' logits independent of padding after them.
"""

from __future__ import annotations

import importlib
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..api import load
from ..checkpoint.save import parse_dtype

importlib.import_module("lm_eval.models")  # lm-eval's own backends first: its registry loads them only while empty


@register_model("llamaherd")
class LlamaherdLM(TemplateLM):
    """A llamaherd model as an lm-eval `LM`: loglikelihood, loglikelihood_rolling and generate_until."""

    def __init__(self, pretrained: str, dtype: str | None = None, max_length: int | None = None,
                 batch_size: int | str = 1, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 **_: object) -> None:
        super().__init__()
        self.model = load(pretrained, dtype=parse_dtype(dtype))
        self.tok = self.model.tokenizer
        self.max_length = int(max_length or min(self.model.config.max_seq_len, 2048))
        self.batch_size = 1 if batch_size in ("auto", None) else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = (self.tok.bos_id is not None) if add_bos_token is None else bool(add_bos_token)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: object) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens and self.tok.bos_id is not None
        return self.tok.encode(string, bos=bool(bos))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # -- scoring ----------------------------------------------------------------------------------------------

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for ctx, cont in pairs:
            ids = (ctx + cont)[-(self.max_length + 1):]
            rows.append(ids[:-1])  # the inputs; the last token is only predicted
        order = sorted(range(len(pairs)), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            group = order[start:start + self.batch_size]
            width = len(rows[group[0]])
            batch = torch.zeros(len(group), width, dtype=torch.long)
            for r, i in enumerate(group):
                batch[r, :len(rows[i])] = torch.tensor(rows[i])
            logp = torch.log_softmax(self.model.logits(batch).double(), dim=-1)  # (B, T, V)
            for r, i in enumerate(group):
                cont = pairs[i][1]
                end = len(rows[i])
                lp = logp[r, end - len(cont):end]  # (len(cont), V): the positions that predict the continuation
                target = torch.tensor(cont)
                total = float(lp.gather(-1, target[:, None]).sum())
                out[i] = (total, bool((lp.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: object) -> list[tuple[float, bool]]:
        results = self._score([(list(ctx), list(cont)) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of max_length tokens, the first after the prefix token
        (lm-eval's get_rolling_token_windows with context_len=1, as HFLM)."""
        out = []
        for (string,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(string, add_special_tokens=False), self.prefix_token_id, self.max_length, 1)]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) continuations, cut at the first of the task's `until` strings."""
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_tokens):]
            text = self.model.complete(ids, max_tokens=max_tokens, temperature=temperature, stop=until or None).text
            for s in until:  # the stop string itself is never part of the text; cut any the stream let through
                text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main() -> None:
    """`lm_eval`'s command line with this backend registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
