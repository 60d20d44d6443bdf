"""PEFT-format LoRA adapters: adapter_config.json + adapter_model.safetensors under Hugging Face tensor names.

Names follow what PEFT's `save_pretrained` writes for a LlamaForCausalLM / Gemma3ForCausalLM
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`). Llama's HF wq/wk rows are permuted for
rotate-half RoPE (checkpoint/transforms.py); the update B @ A of those projections is permuted the same way, which
means permuting the rows of B and leaving A alone. Gemma's layout equals HF's: no permutation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.transforms import permute_to_hf, unpermute_from_hf
from ..atomic import replacing, write_text
from ..config import ModelConfig
from ..errors import TrainingError
from .layer import LoRAConfig, apply_lora, lora_modules

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# Shape fields an adapter must agree with (stored in the safetensors metadata; PEFT ignores it).
_SHAPE_FIELDS = ("arch", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim")


def _hf_table(config: ModelConfig) -> dict[str, str]:
    """Canonical weight name -> HF weight name ("{i}" for the layer), for the families whose HF names we know."""
    from ..checkpoint import gemma3, llama
    from ..checkpoint.names import invert

    families = {"llama": llama, "gemma3": gemma3}
    if config.arch not in families:
        raise TrainingError(f"PEFT adapters are written for Llama 1-3 and Gemma 3 models, not arch {config.arch!r}")
    return invert(families[config.arch].HF_NAMES)


def hf_module_name(name: str, config: ModelConfig) -> str:
    """'layers.3.attention.wq' -> 'model.layers.3.self_attn.q_proj'."""
    from ..checkpoint.names import rename

    hf = rename(name + ".weight", _hf_table(config))
    if hf is None:
        raise TrainingError(f"module {name} has no Hugging Face name for a {config.arch} model")
    return hf[: -len(".weight")]


def _rope_heads(name: str, config: ModelConfig) -> int | None:
    """Heads whose rows HF permutes (Llama wq/wk only), else None."""
    if config.arch != "llama":
        return None
    if name.endswith("attention.wq"):
        return config.n_heads
    if name.endswith("attention.wk"):
        return config.n_kv_heads
    return None


def _fingerprint(config: ModelConfig) -> dict[str, str]:
    return {f"llamaherd.{f}": str(getattr(config, f)) for f in _SHAPE_FIELDS}


def save_adapter(net: nn.Module, config: ModelConfig, lora: LoRAConfig, out: str | Path, base: str = "",
                 weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT folder (loadable by `peft.PeftModel.from_pretrained`).

    `weights` ({"layers.0.attention.wq.lora_A.weight": ...}) replaces the modules' own tensors: a sharded
    model's adapters gathered whole (train/distributed.py)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, hf_targets = {}, set()
    for name, m in lora_modules(net).items():
        hf = hf_module_name(name, config)
        hf_targets.add(hf.rsplit(".", 1)[-1])
        a, b = ((weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]) if weights is not None
                else (m.lora_A.weight, m.lora_B.weight))
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        heads = _rope_heads(name, config)
        if heads is not None:
            b = permute_to_hf(b, heads)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous()
    if not tensors:
        raise TrainingError("the model carries no LoRA adapters to save")
    layers = sorted({int(n.split(".")[1]) for n in lora_modules(net)})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base or None,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(hf_targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None if layers == list(range(config.n_layers)) else layers,
    }
    # Each file atomically, the config last: a killed save leaves whole files, never a truncated one.
    with replacing(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **_fingerprint(config)})
    write_text(out / CONFIG_FILE, json.dumps(peft_config, indent=2) + "\n")
    return out


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(adapter_config, tensors, safetensors metadata) of a PEFT LoRA folder, validated."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        raise TrainingError(f"{path}: not a PEFT adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise TrainingError(f"{cfg_file}: not valid JSON ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise TrainingError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters are supported")
    unsupported = [k for k in ("use_dora", "use_rslora", "modules_to_save") if cfg.get(k)]
    if unsupported:
        raise TrainingError(f"{cfg_file}: {', '.join(unsupported)} not supported; use a plain LoRA adapter")
    with safe_open(str(w_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    return cfg, tensors, meta


def load_adapter(net: nn.Module, config: ModelConfig, path: str | Path) -> LoRAConfig:
    """Wrap `net` with the LoRA adapters of a PEFT folder (ours or PEFT's own); an adapter for another base raises."""
    cfg, tensors, meta = read_adapter(path)
    mine = _fingerprint(config)
    differ = [k.split(".", 1)[1] for k, v in mine.items() if k in meta and meta[k] != v]
    if differ:
        raise TrainingError(f"{path}: adapter was trained for another base model ({', '.join(differ)} differ: "
                            + ", ".join(f"{f} {meta['llamaherd.' + f]} vs {mine['llamaherd.' + f]}" for f in differ)
                            + "); load it over the model it was trained on")
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    by_hf = {}
    for key, t in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.", ".")
        module, _, which = name.rpartition(".lora_")
        by_hf.setdefault(module, {})[which.split(".")[0]] = t
    targets = sorted({m.rsplit(".", 1)[-1] for m in by_hf})
    lora = LoRAConfig(rank=rank, alpha=alpha, dropout=0.0, targets=tuple(targets),
                      layers=tuple(cfg["layers_to_transform"]) if cfg.get("layers_to_transform") else None)
    wrapped = apply_lora(net, lora)
    seen = set()
    with torch.no_grad():
        for name, m in wrapped.items():
            hf = hf_module_name(name, config)
            pair = by_hf.get(hf)
            if pair is None or "A" not in pair or "B" not in pair:
                raise TrainingError(f"{path}: no lora_A/lora_B weights for {hf}; the adapter does not fit this model")
            a, b = pair["A"], pair["B"]
            heads = _rope_heads(name, config)
            if heads is not None:
                b = unpermute_from_hf(b, heads)
            if a.shape != m.lora_A.weight.shape or b.shape != m.lora_B.weight.shape:
                raise TrainingError(f"{path}: {hf} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, this model "
                                    f"needs {tuple(m.lora_A.weight.shape)} / {tuple(m.lora_B.weight.shape)}: "
                                    "an adapter for another base model")
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b)
            seen.add(hf)
    extra = sorted(set(by_hf) - seen)
    if extra:
        raise TrainingError(f"{path}: adapter weights for modules this model lacks ({', '.join(extra[:4])}...): "
                            "an adapter for another base model")
    return lora
