"""The preset table: every released model's size equals the published size; lookups are exact."""

import pytest

from llamaherd import presets
from llamaherd.cli import main
from llamaherd.config import ConfigError, ffn_hidden_dim

REQUIRED = [
    "llama-7b", "llama-13b", "llama-33b", "llama-65b",
    "llama-2-7b", "llama-2-7b-chat", "llama-2-13b", "llama-2-13b-chat", "llama-2-70b", "llama-2-70b-chat",
    "code-llama-7b", "code-llama-7b-python", "code-llama-7b-instruct",
    "code-llama-13b", "code-llama-13b-python", "code-llama-13b-instruct",
    "code-llama-34b", "code-llama-34b-python", "code-llama-34b-instruct",
    "code-llama-70b", "code-llama-70b-python", "code-llama-70b-instruct",
    "llama-3-8b", "llama-3-8b-instruct", "llama-3-70b", "llama-3-70b-instruct",
    "llama-3.1-8b", "llama-3.1-8b-instruct", "llama-3.1-70b", "llama-3.1-70b-instruct",
    "llama-3.1-405b", "llama-3.1-405b-instruct",
    "llama-3.2-1b", "llama-3.2-1b-instruct", "llama-3.2-3b", "llama-3.2-3b-instruct",
    "llama-3.3-70b-instruct", "llama-guard-3-1b", "llama-guard-3-8b",
]


def test_every_release_has_a_row():
    missing = [n for n in REQUIRED if n not in presets.PRESETS]
    assert not missing


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_parameter_count_matches_published_size(name):
    p = presets.PRESETS[name]
    total, active = presets.count_parameters(p.config)
    total += p.unbuilt_params  # a multimodal release's published size includes its vision tower
    value, unit = presets.parse_size(p.published_params)
    # Equal to the published figure to its last written digit (papers sometimes truncate instead of round).
    assert abs(total - value) <= unit, f"{name}: {total:,} parameters, published {p.published_params}"
    if p.published_active_params:
        value, unit = presets.parse_size(p.published_active_params)
        assert abs(active - value) <= unit, f"{name}: {active:,} active, published {p.published_active_params}"
    assert p.source


def test_headline_sizes_named_in_the_issue():
    # Published figures (model cards): Llama 3.1 8B 8.03B, Llama 3.2 1B 1.24B, Llama 3.3 70B 70.6B.
    for name, billions in [("llama-3.1-8b", 8.03), ("llama-3.2-1b", 1.24), ("llama-3.3-70b-instruct", 70.6)]:
        total, _ = presets.count_parameters(presets.get(name).config)
        assert round(total / 1e9, 2 if billions < 10 else 1) == billions


def test_meta_feed_forward_rule():
    # Widths stated in the releases' config.json intermediate_size.
    assert ffn_hidden_dim(4096, 256) == 11008  # Llama 2 7B
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672  # Llama 2/3 70B
    assert ffn_hidden_dim(2048, 256, 1.5) == 8192  # Llama 3.2 1B
    assert ffn_hidden_dim(16384, 4096, 1.2) == 53248  # Llama 3.1 405B


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="known presets: .*llama-3.1-8b"):
        presets.get("llama-3.1-9b")


def test_show_prints_config_and_count(capsys):
    assert main(["show", "llama-3.1-8b"]) == 0
    out = capsys.readouterr().out
    assert "8.03B" in out and "8,030,261,248" in out and "rope_scaling" in out


def test_show_unknown_model_is_one_clear_error(capsys):
    assert main(["show", "no-such-model-xyz"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("herd: error:") and "herd presets" in err and "Traceback" not in err


def test_show_template_renders_the_presets_chat_format(capsys):
    assert main(["show", "llama-3.2-1b-instruct", "--template"]) == 0
    out = capsys.readouterr().out
    # Llama 3.2's pythonic tool-call format, with Llama 3 headers (llama-models llama3_2/text_prompt_format.md).
    assert "<|start_header_id|>user<|end_header_id|>" in out and "[get_weather(" in out
    assert main(["show", "llama-3.1-8b", "--template"]) == 1  # a base model has no chat format
