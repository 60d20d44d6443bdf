"""The memory plan: refusal before any weight is read (in a subprocess, with the numbers), and its parts against
what the loaded model and its KV cache actually hold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import llamaherd
from llamaherd.config import ModelConfig
from llamaherd.memory import MemoryPlanError, parse_size
from llamaherd.model.cache import KVCache

ROOT = Path(__file__).resolve().parent.parent

# 166M parameters: 317 MiB of bf16 weights, large enough that reading them would show in the peak RSS.
BIG = ModelConfig(dim=1024, n_layers=6, n_heads=8, n_kv_heads=8, vocab_size=32000, multiple_of=256,
                  hidden_dim=4096, max_seq_len=4096)
SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=512)


def hf_folder(dst: Path, c: ModelConfig, dtype=torch.bfloat16) -> Path:
    """A Hugging Face Llama folder written with safetensors and plain JSON (zeros: only the sizes matter)."""
    kv = c.n_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.dim), "model.norm.weight": (c.dim,),
              "lm_head.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (c.dim, c.dim), p + "self_attn.k_proj.weight": (kv, c.dim),
                       p + "self_attn.v_proj.weight": (kv, c.dim), p + "self_attn.o_proj.weight": (c.dim, c.dim),
                       p + "mlp.gate_proj.weight": (c.hidden_dim, c.dim), p + "mlp.up_proj.weight": (c.hidden_dim, c.dim),
                       p + "mlp.down_proj.weight": (c.dim, c.hidden_dim), p + "input_layernorm.weight": (c.dim,),
                       p + "post_attention_layernorm.weight": (c.dim,)})
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch.")}))
    return dst


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return hf_folder(tmp_path_factory.mktemp("mem") / "big", BIG)


REFUSE = r"""
import json, sys
import llamaherd
from llamaherd.memory import MemoryPlanError

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

try:
    llamaherd.load(sys.argv[1], max_memory=sys.argv[2], num_ctx=int(sys.argv[3]))
    print(json.dumps({"loaded": True}))
except MemoryPlanError as exc:
    p = exc.plan
    print(json.dumps({"loaded": False, "message": str(exc), "weights": p.weights, "kv": p.kv_cache,
                      "runtime": p.runtime, "total": p.total, "peak": hwm()}))
"""


def test_load_over_budget_is_refused_before_reading_weights(big):
    weights = sum(t.numel() * 2 for t in llamaherd.checkpoint.read(big).state_dict.values())
    out = subprocess.run([sys.executable, "-c", REFUSE, str(big), "750M", "4096"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["loaded"] is False
    assert r["weights"] == weights  # 2 bytes per bf16 parameter, from the file's own tensor sizes
    # KV for 4096 tokens: 2 (k, v) x 6 layers x 8 heads x 128 x 2 bytes each.
    assert r["kv"] == 4096 * 2 * 6 * 8 * 128 * 2
    # Refused before allocation: the peak is the runtime, not the runtime plus the 317 MiB of weights.
    assert r["peak"] < r["runtime"] + weights / 4, r
    msg = r["message"]
    assert "750 MiB" in msg and "4096-token context" in msg and "weights 317 MiB" in msg and "KV cache 96 MiB" in msg
    assert re.search(r"num_ctx \d+ fits", msg) and "--quantize" in msg  # the ways out


def test_herd_run_over_budget_exits_with_the_plan(big):
    out = subprocess.run([sys.executable, "-m", "llamaherd", "run", str(big), "hello", "--max-memory", "250M",
                          "--num-ctx", "1024", "--raw"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    err = out.stderr
    assert "herd: error: this model needs" in err and "more than the memory budget (max_memory) of 250 MiB" in err
    assert re.search(r"weights 317 MiB, KV cache 24 MiB, working buffers \d+ MiB", err), err
    assert "Traceback" not in err


def test_herd_show_memory_prints_the_plan(big, capsys):
    from llamaherd.cli import main

    assert main(["show", str(big), "--memory", "--num-ctx", "2048", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["num_ctx"] == 2048 and r["memory"]["KV cache"] == 2048 * 2 * 6 * 8 * 128 * 2
    assert r["memory"]["total"] == sum(v for k, v in r["memory"].items() if k != "total")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_parts_equal_what_the_model_and_its_cache_hold(tmp_path, dtype):
    folder = hf_folder(tmp_path / "small", SMALL, dtype)
    model = llamaherd.load(folder, num_ctx=300, max_memory="64G")
    plan = model.memory_plan
    held = sum(t.untyped_storage().nbytes() for t in model.net.state_dict().values())
    assert plan.weights == held and plan.conversion == 0
    cache = KVCache.for_model(model.config, 1, 300, dtype=dtype)
    assert plan.kv_cache == cache.k.nbytes + cache.v.nbytes


def test_dtype_conversion_is_planned(tmp_path):
    folder = hf_folder(tmp_path / "small", SMALL, torch.bfloat16)
    model = llamaherd.load(folder, dtype=torch.float32, num_ctx=64)
    held = sum(t.untyped_storage().nbytes() for t in model.net.state_dict().values())
    assert model.memory_plan.weights == held
    assert model.memory_plan.conversion == held // 2  # the bf16 source pages read while converting


def test_over_budget_error_is_typed_and_names_a_fitting_context(tmp_path):
    folder = hf_folder(tmp_path / "small", SMALL)
    plan = llamaherd.load(folder, num_ctx=512).memory_plan
    budget = plan.total - (plan.kv_cache + plan.working + plan.kept) // 2  # room for half the context
    plan.check(plan.total)
    with pytest.raises(MemoryPlanError, match=r"num_ctx 256 fits") as err:
        plan.check(budget)
    assert err.value.plan is plan


@pytest.mark.parametrize("text, n", [("512M", 512 << 20), ("8G", 8 << 30), ("1.5GiB", 3 << 29), ("4096", 4096),
                                     ("2gb", 2 << 30)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "-1G", "0", "lots", "1.5.2G", "8X"])
def test_parse_size_refuses(text):
    with pytest.raises(llamaherd.errors.LlamaherdError, match="memory size"):
        parse_size(text)
