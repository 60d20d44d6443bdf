"""`herd prompt-format`: plain text off a tty, ANSI-highlighted special tokens on request, HF folders."""

from __future__ import annotations

import json

from llamaherd.cli import main

from .chat_fixtures import LLAMA31_TEMPLATE, ours, tiny_hf_tokenizer_json


def test_plain_and_colour(capsys):
    assert main(["prompt-format", "llama3", "--tools"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "<|python_tag|>" not in out
    assert out.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython")
    assert main(["prompt-format", "llama4", "--color", "always"]) == 0
    assert "\x1b[1;36m<|header_start|>\x1b[0m" in capsys.readouterr().out


def test_hf_folder_and_errors(tmp_path, capsys):
    specials = sorted(ours("llama3").special_tokens, key=ours("llama3").special_tokens.get)
    tiny_hf_tokenizer_json(tmp_path, specials)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": LLAMA31_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    assert main(["prompt-format", str(tmp_path)]) == 0
    assert "Today Date: 26 Jul 2024" in capsys.readouterr().out
    assert main(["prompt-format", str(tmp_path / "missing")]) == 1
    assert "tokenizer_config.json" in capsys.readouterr().err
