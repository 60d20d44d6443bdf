"""KL divergence of a model's next-token distributions from a base model's, as `llama-perplexity --kl-divergence`.

`save_base` runs the base model over the perplexity chunks (eval/perplexity.py) and writes, per scored position,
the top-k token ids and log-probabilities, the log-probability of everything outside the top k, and the NLL of
the text's next token. `compare` runs another model over the same tokens and reports llama.cpp's statistics
(tools/perplexity/perplexity.cpp `kl_divergence`): PPL(Q), PPL(base), their ratio and correlation, mean KLD with
percentiles, Δp and "same top p".

The base file is ours, not llama.cpp's (which keeps every token's log-probability as uint16 steps): an .npz
(numpy arrays only, read with allow_pickle=False). With top-k, the KLD is that of the two distributions over
k + 1 outcomes (the base's top k tokens and "any other token"): a lower bound of the full KLD that misses only
the divergence inside the base's tail. llama.cpp also drops base tokens of log-probability below -16; with
k = 128 (default) the tail this leaves out holds on the order of 1e-3 of the mass or less on a trained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import replacing
from ..errors import LlamaherdError
from .perplexity import Perplexity, Progress, next_tokens, batch_for, chunk_tokens, encode_text, scored_logits, token_nll

FORMAT = "llamaherd-kld-base-1"
TOP_K = 128


def _rest_logp(logp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `top_ids`, computed from the tail's own terms (no 1 - sum cancellation)."""
    tail = logp.scatter(-1, top_ids, float("-inf"))
    return torch.logsumexp(tail, dim=-1)


def save_base(model, text: str | list[int], path: str | Path, n_ctx: int = 512, *, top_k: int = TOP_K,
              chunks: int | None = None, batch_tokens: int = 2048, progress: Progress | None = None) -> Perplexity:
    """Write the base model's log-probabilities over `text` (see the module docstring) to `path` (.npz);
    returns the base model's perplexity, computed in the same pass."""
    tokens = encode_text(model, text) if isinstance(text, str) else [int(t) for t in text]
    bos = model.tokenizer.bos_id if model.tokenizer is not None else None
    grid = chunk_tokens(tokens, n_ctx, bos, chunks)
    targets = next_tokens(grid, tokens)
    b = batch_for(n_ctx, batch_tokens)
    ids, lps, rest, nll = [], [], [], []
    for i, logits in enumerate(scored_logits(model.net, grid, b, progress)):
        k = min(top_k, logits.shape[-1])
        logp = torch.log_softmax(logits, dim=-1)
        top_lp, top_id = logp.topk(k, dim=-1)  # sorted: column 0 is the base's top token
        ids.append(top_id.int().flatten(0, 1).cpu())
        lps.append(top_lp.flatten(0, 1).cpu())
        rest.append(_rest_logp(logp, top_id).flatten().cpu())
        nll.append(token_nll(logits, targets[i * b:i * b + logits.shape[0]].to(logits.device)).flatten().cpu())
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name without it
        np.savez(f, format=np.array(FORMAT), n_ctx=np.array(n_ctx), n_vocab=np.array(model.config.vocab_size),
                 tokens=np.array(tokens[: grid.numel()], dtype=np.int32), top_ids=torch.cat(ids).numpy(),
                 top_logp=torch.cat(lps).numpy(), rest_logp=torch.cat(rest).numpy(), nll=torch.cat(nll).numpy())
    return Perplexity(n_ctx=n_ctx, n_chunks=grid.shape[0], nll=torch.cat(nll).numpy())


@dataclass
class Base:
    n_ctx: int
    n_vocab: int
    tokens: list[int]
    top_ids: torch.Tensor  # (N, k) int64
    top_logp: torch.Tensor  # (N, k) float32
    rest_logp: torch.Tensor  # (N,) float32
    nll: np.ndarray  # (N,) float64


def load_base(path: str | Path) -> Base:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != FORMAT:
                raise LlamaherdError(f"{path}: a KL-divergence base file of format {z['format']}, not {FORMAT}")
            return Base(int(z["n_ctx"]), int(z["n_vocab"]), z["tokens"].tolist(),
                        torch.from_numpy(z["top_ids"]).long(), torch.from_numpy(z["top_logp"]),
                        torch.from_numpy(z["rest_logp"]), z["nll"])
    except (KeyError, ValueError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise LlamaherdError(f"{path} is not a KL-divergence base file written by `herd perplexity "
                             f"--kl-divergence-base` ({exc}); write one with that option") from None


def kld_rows(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, rest_logp: torch.Tensor):
    """Per position KL(base || model) over the base's top k + rest, and whether the two top tokens agree."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    q_top = logq.gather(-1, top_ids).double()
    q_rest = _rest_logp(logq, top_ids).double()
    p_top, p_rest = top_logp.double(), rest_logp.double()
    kld = (p_top.exp() * (p_top - q_top)).sum(-1)
    finite = torch.isfinite(p_rest)  # a vocabulary no larger than k has no tail
    kld = kld + torch.where(finite, p_rest.exp() * (p_rest - q_rest), torch.zeros_like(kld))
    same = logq.argmax(-1) == top_ids[:, 0]
    return kld, same


def _mean_unc(x: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and the standard error of the mean (0 for 10 values or fewer)."""
    n = x.size
    f = float(x.mean())
    df = float((x**2).mean()) - f * f
    return f, math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0


@dataclass
class Comparison:
    """The statistics `llama-perplexity --kl-divergence` prints, over every scored position."""

    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray

    def report(self) -> str:
        n = self.kld.size
        lp, lp_unc = _mean_unc(self.nll)
        lb, lb_unc = _mean_unc(self.nll_base)
        cov = (float((self.nll * self.nll_base).mean()) - lp * lb) / (n - 1) if n >= 10 else 0.0
        ratio_unc = math.sqrt(max(lp_unc**2 + lb_unc**2 - 2 * cov, 0.0))
        ppl, ppl_b = math.exp(lp), math.exp(lb)
        k, k_unc = _mean_unc(self.kld)
        dp = np.exp(-self.nll) - np.exp(-self.nll_base)
        dp2, dp2_unc = _mean_unc(dp**2)
        top = float(self.same_top.mean())
        # llama.cpp's percentile: linear interpolation at fraction * (n - 1) of the sorted values (numpy's default)
        q = lambda v, f: float(np.quantile(v, f))  # noqa: E731
        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {ppl:10.6f} ± {ppl * lp_unc:10.6f}",
            f"Mean PPL(base)                : {ppl_b:10.6f} ± {ppl_b * lb_unc:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * cov / (lp_unc * lb_unc) if lp_unc * lb_unc else 0.0:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {lp - lb:10.6f} ± {ratio_unc:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {math.exp(lp - lb):10.6f} ± {math.exp(lp - lb) * ratio_unc:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {k:10.6f} ± {k_unc:10.6f}",
            f"Maximum KLD: {self.kld.max():10.6f}",
        ]
        for label, f in (("99.9%", .999), ("99.0%", .99), ("95.0%", .95), ("90.0%", .9), ("Median", .5),
                         ("10.0%", .1), (" 5.0%", .05), (" 1.0%", .01), (" 0.1%", .001)):
            lines.append(f"{label:<7} KLD: {q(self.kld, f):10.6f}")
        lines += [
            f"Minimum KLD: {self.kld.min():10.6f}",
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {100 * dp.mean():6.3f} ± {100 * _mean_unc(dp)[1]:5.3f} %",
            f"RMS Δp    : {100 * math.sqrt(dp2):6.3f} ± {100 * 0.5 / math.sqrt(dp2) * dp2_unc if dp2 else 0.0:5.3f} %",
            f"Same top p: {100 * top:6.3f} ± {100 * math.sqrt(top * (1 - top) / max(n - 1, 1)):5.3f} %",
        ]
        return "\n".join(lines)

    @property
    def mean_kld(self) -> float:
        return float(self.kld.mean())

    @property
    def same_top_rate(self) -> float:
        return float(self.same_top.mean())

    @property
    def ppl_ratio(self) -> float:
        return math.exp(float(self.nll.mean() - self.nll_base.mean()))


def compare(model, base: str | Path | Base, *, batch_tokens: int = 2048, progress: Progress | None = None) -> Comparison:
    """Run `model` over the base file's tokens and compare its distributions to the base's."""
    base = load_base(base) if not isinstance(base, Base) else base
    if base.n_vocab != model.config.vocab_size:
        raise LlamaherdError(f"the base file was written by a model with a vocabulary of {base.n_vocab} tokens, "
                             f"this model has {model.config.vocab_size}: KL divergence needs the same vocabulary")
    bos = model.tokenizer.bos_id if model.tokenizer is not None else None
    grid = chunk_tokens(base.tokens, base.n_ctx, bos, min_tokens=base.n_ctx)  # the base's chunks, one or more
    targets = next_tokens(grid, base.tokens)
    b = batch_for(base.n_ctx, batch_tokens)
    per = base.n_ctx - 1 - base.n_ctx // 2
    nll, kld, same = [], [], []
    for i, logits in enumerate(scored_logits(model.net, grid, b, progress)):
        rows = slice(i * b * per, (i * b + logits.shape[0]) * per)
        flat = logits.flatten(0, 1)
        k, s = kld_rows(flat, base.top_ids[rows].to(flat.device), base.top_logp[rows].to(flat.device),
                        base.rest_logp[rows].to(flat.device))
        kld.append(k.cpu())
        same.append(s.cpu())
        nll.append(token_nll(logits, targets[i * b:i * b + logits.shape[0]].to(logits.device)).flatten().cpu())
    return Comparison(torch.cat(nll).numpy(), base.nll, torch.cat(kld).numpy(), torch.cat(same).numpy())
