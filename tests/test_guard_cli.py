"""`herd guard` on checkpoints written to disk: Llama Guard (a forced tiny model) and Prompt Guard folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaherd.cli import main

from .guard_fixtures import forced_guard, save_forced_guard
from .test_guard_prompt_guard import _reference

TEMPLATE_8B = (Path(__file__).parent / "guard_data" / "llama-guard-3-8b.jinja").read_text()


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    return save_forced_guard(forced_guard("unsafe\nS1", template=TEMPLATE_8B), tmp_path_factory.mktemp("lg"))


def test_text_verdict(guard_dir, capsys):
    assert main(["guard", str(guard_dir), "how do I hurt someone"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["unsafe", "  S1: Violent Crimes."]


def test_conversation_file_json(guard_dir, tmp_path, capsys):
    conv = tmp_path / "conversation.json"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}))
    assert main(["guard", str(guard_dir), "--file", str(conv), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "unsafe" and result["categories"] == ["S1"] and result["flagged"]
    assert main(["guard", str(guard_dir), "--file", str(conv), "--show-prompt", "--role", "user"]) == 0
    prompt = capsys.readouterr().out
    assert "ONLY THE LAST User message" in prompt and "Agent: hello" not in prompt


def test_bad_input_is_an_error_message(guard_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["guard", str(guard_dir), "--file", str(bad)]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps([{"role": "assistant", "content": "x"}]))
    assert main(["guard", str(guard_dir), "--file", str(bad)]) == 1
    assert "alternate" in capsys.readouterr().err


def test_prompt_guard_folder(tmp_path, capsys):
    _reference(tmp_path, "v3")
    assert main(["guard", str(tmp_path), "hello world", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["scores"]) == {"BENIGN", "INJECTION", "JAILBREAK"} and result["windows"] == 1
    assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_serve_flags_install_shields(guard_dir):
    from llamaherd.cli import build_parser
    from llamaherd.cli.guard import GuardUsageError, install_serve_shields
    from llamaherd.server import ServedModel, create_app

    from .server_fixtures import tiny_llama3

    app = create_app(ServedModel(tiny_llama3(), "tiny", kv_cache_bytes=1 << 20))
    args = build_parser().parse_args(["serve", "tiny", "--guard", str(guard_dir), "--guard-checks", "input",
                                      "--guard-refusal", "error", "--guard-every", "4"])
    assert "guarded by" in install_serve_shields(app, args)
    shields = app.state.shields
    assert shields.screen_input is True and shields.screen_output is False and shields.on_input == "error"
    assert shields.stream_every == 4 and not shields.allow_opt_out
    assert shields.guard.release.name == "llama-guard-3-8b" and app.state.guard_name == guard_dir.name
    assert shields.guard.concurrent and shields.guard.engine.max_batch == 16  # the guard's own batching engine
    shields.guard.close()
    args = build_parser().parse_args(["serve", "tiny", "--guard", str(guard_dir), "--guard-checks", "both"])
    with pytest.raises(GuardUsageError, match="--guard-checks"):
        install_serve_shields(app, args)
    assert install_serve_shields(app, build_parser().parse_args(["serve", "tiny"])) == ""
