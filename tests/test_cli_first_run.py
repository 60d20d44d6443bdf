"""A newcomer's first commands: model arguments are never guessed into prompt text, flags are spelled one way,
help texts are true, every model can chat, and an empty prompt is refused the same way in the CLI and HTTP."""

import re

import httpx
import pytest

from llamaherd.cli import build_parser, main

from .store_fixtures import random_gemma_state, write_tiny_gemma_gguf


@pytest.fixture(autouse=True)
def empty_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAHERD_HOME", str(tmp_path / "herd"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))


def _fails(capsys, argv) -> str:
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.out == ""  # nothing generated
    return out.err


@pytest.mark.parametrize("word, hint", [
    ("models/does-not-exist.gguf", "no such file or folder: models/does-not-exist.gguf"),
    ("gemma-3-270m-q4km", "did you mean gemma-3-270m-q4_k_m?"),
    ("gemma3:270", "did you mean gemma-3-270m-q4_k_m?"),
])
def test_a_missing_model_is_an_error_with_the_closest_names_never_prompt_text(capsys, word, hint):
    err = _fails(capsys, ["run", word, "hi"])
    assert hint in err and err.count("\n") == 1


def test_a_near_miss_of_a_file_suggests_the_file(capsys, tmp_path):
    real = write_tiny_gemma_gguf(tmp_path / "tiny-gemma.gguf", random_gemma_state())
    err = _fails(capsys, ["run", str(tmp_path / "tiny-gemma.guff"), "hi"])
    assert f"did you mean {real}" in err


def test_prompt_words_are_not_taken_for_models():
    from llamaherd.cli.run import split_model_and_prompt
    from llamaherd.store import DEFAULT_MODEL

    assert split_model_and_prompt(["Why", "is", "the", "sky", "blue?"]) == (DEFAULT_MODEL, "Why is the sky blue?")
    assert split_model_and_prompt(["The capital of France is"]) == (DEFAULT_MODEL, "The capital of France is")
    assert split_model_and_prompt([]) == (DEFAULT_MODEL, None)


def test_the_empty_prompt_is_refused_in_the_cli(capsys, tmp_path):
    err = _fails(capsys, ["run", "--max-tokens", "20", ""])  # was read as the model path "."
    assert "the prompt is empty" in err
    model = write_tiny_gemma_gguf(tmp_path / "g.gguf", random_gemma_state())
    assert "the prompt is empty" in _fails(capsys, ["run", str(model), "  "])


def test_the_empty_prompt_is_refused_over_http():
    from .server_fixtures import start

    server, _ = start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for prompt in ("", ["ok", " "]):
                r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
                assert r.status_code == 400 and "prompt is empty" in r.json()["error"]["message"]
            # Ollama's protocol: an empty prompt loads the model (its CLI sends one to preload)
            assert c.post("/api/generate", json={"prompt": ""}).json()["done_reason"] == "load"
    finally:
        server.stop()


def test_flags_are_spelled_one_way():
    p = build_parser()
    assert p.parse_args(["serve", "--num-ctx", "64"]).num_ctx == 64
    assert p.parse_args(["run", "--num-ctx", "64", "x"]).num_ctx == 64
    assert p.parse_args(["perplexity", "--num-ctx", "64", "m"]).num_ctx == 64
    for verb in (["serve"], ["perplexity", "m"]):
        with pytest.raises(SystemExit):
            p.parse_args([verb[0], "--ctx", "64", *verb[1:]])
    for verb in (["run", "x"], ["chat"], ["serve"], ["bench", "m"]):
        for dtype in ("bf16", "bfloat16", "f16", "float32"):
            assert p.parse_args([verb[0], "--dtype", dtype, *verb[1:]]).dtype == dtype
    for verb in (["run", "x"], ["chat"], ["serve"]):
        assert p.parse_args([verb[0], "--chat-format", "gemma3", *verb[1:]]).chat_format == "gemma3"


def test_help_texts_are_true(capsys):
    from llamaherd.chat import FORMATS

    for argv in (["show", "--help"], ["prompt-format", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    text = capsys.readouterr().out
    assert "--list" not in text and "herd presets" in text
    help_text = " ".join(text.split())
    assert all(name in help_text for name in FORMATS)


def test_presets_table_has_a_header_and_aligned_columns(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PARAMETERS", "ARCH", "CHAT", "FORMAT"]
    # Every row's parameter column ends at the same place, and its arch column starts at the same place.
    ends = {m.end() for m in (re.match(r"\S+\s+\S+", line) for line in lines)}
    starts = {line.index(line.split()[2], m.end()) for line, m in ((ln, re.match(r"\S+\s+\S+", ln)) for ln in lines)}
    assert len(ends) == 1 and len(starts) == 1 and len(lines) > 20


def test_chat_defaults_to_the_default_model(monkeypatch):
    from llamaherd.cli import chat
    from llamaherd.store import DEFAULT_MODEL

    seen = []

    class Stop(Exception):
        pass

    def fake_load(name, *args, **kwargs):  # dtype, adapter, max_memory, num_ctx
        seen.append(name)
        raise Stop

    monkeypatch.setattr(chat, "load_model", fake_load)
    with pytest.raises(Stop):
        main(["chat"])
    assert seen == [DEFAULT_MODEL]


def test_show_says_which_builtin_chat_format_is_used(capsys, tmp_path):
    path = write_tiny_gemma_gguf(tmp_path / "g.gguf", random_gemma_state(),
                                 extra_specials=("<start_of_turn>", "<end_of_turn>"))
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"chat format\s+gemma3 \(no chat template in the checkpoint: using the built-in gemma3", out)
    bare = write_tiny_gemma_gguf(tmp_path / "bare.gguf", random_gemma_state())
    assert main(["show", str(bare)]) == 0
    assert "none (completion only; --chat-format NAME gives it one)" in capsys.readouterr().out


def test_chat_format_flag_makes_a_model_chat(capsys, tmp_path):
    """A base model with no format chats once --chat-format names one: the reply comes through model.chat."""
    path = write_tiny_gemma_gguf(tmp_path / "g.gguf", random_gemma_state(),
                                 extra_specials=("<start_of_turn>", "<end_of_turn>"))
    from llamaherd import load

    model = load(path)
    assert model.chat_format_choice.completes  # a base Gemma: `herd run` completes its prompt as text
    from llamaherd.cli._generation import apply_chat_format

    apply_chat_format(model, "llama2")
    assert model.chat_format_name == "llama2" and not model.chat_format_choice.completes
    assert main(["run", str(path), "--chat-format", "gemma3", "--max-tokens", "3", "--temperature", "0", "hi"]) == 0
    expected = load(path).chat([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)["content"]
    assert capsys.readouterr().out.strip() == expected.strip()


def test_show_template_of_a_format_without_tools(capsys, tmp_path):
    path = write_tiny_gemma_gguf(tmp_path / "g.gguf", random_gemma_state(),
                                 extra_specials=("<start_of_turn>", "<end_of_turn>"))
    assert main(["show", "--template", str(path)]) == 0
    out = capsys.readouterr().out
    assert "<start_of_turn>user\n" in out and "<start_of_turn>model\n" in out


def test_rm_and_pull_suggest_the_closest_names(capsys, tmp_path):
    import json
    import os

    folder = tmp_path / "herd" / "models" / "tiny-gemma"
    folder.mkdir(parents=True)
    write_tiny_gemma_gguf(folder / "g.gguf", random_gemma_state())
    (folder / "manifest.json").write_text(json.dumps({"name": "tiny-gemma", "file": "g.gguf"}))
    assert "did you mean tiny-gemma?" in _fails(capsys, ["rm", "tiny-gema"])
    assert os.path.isdir(folder)
    assert "did you mean gemma-3-270m-q4_k_m?" in _fails(capsys, ["pull", "gemma3-270m"])


def test_a_chat_format_the_vocabulary_cannot_speak_fails_at_once(capsys, tmp_path):
    path = write_tiny_gemma_gguf(tmp_path / "g.gguf", random_gemma_state())
    err = _fails(capsys, ["run", str(path), "--chat-format", "llama3", "hi"])
    assert "needs special token '<|begin_of_text|>'" in err


def test_builtin_chat_format_from_architecture_and_vocabulary():
    """As llama.cpp picks a built-in template for a GGUF without one: by architecture and vocabulary."""
    import numpy as np

    from llamaherd.chat import choose_format
    from llamaherd.errors import ChatFormatError
    from llamaherd.tokenizer import Tokenizer
    from llamaherd.tokenizer.gguf_vocab import from_metadata

    def gguf_vocab(model: str, specials=()):
        tokens = ["<unk>", "<s>", "</s>", *specials] + [f"t{i}" for i in range(40)]
        types = np.array([3] * (3 + len(specials)) + [1] * 40, dtype=np.int32)
        md = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
              "tokenizer.ggml.scores": np.zeros(len(tokens), dtype=np.float32), "tokenizer.ggml.bos_token_id": 1,
              "tokenizer.ggml.eos_token_id": 2}
        if model == "gpt2":
            md["tokenizer.ggml.merges"] = ["t 1"]
        return from_metadata(md)

    spm_llama = choose_format("llama", gguf_vocab("llama"))
    assert (spm_llama.name, spm_llama.builtin, spm_llama.completes) == ("llama2", True, False)
    gemma = choose_format("gemma3", gguf_vocab("llama", ("<start_of_turn>", "<end_of_turn>")))
    assert (gemma.name, gemma.builtin, gemma.completes) == ("gemma3", True, True)
    assert choose_format("llama", Tokenizer.llama3()).name == "llama3"
    assert choose_format("llama", Tokenizer.llama3(), template="{{ x }}").name == "llama3"  # native first
    assert choose_format("llama4", Tokenizer.llama4()).name == "llama4"
    assert choose_format("gemma3", gguf_vocab("llama"), template="{{ x }}").name == "hf"
    assert choose_format("gemma3", None, explicit="llama2").name == "llama2"
    for arch, tok in (("gemma3", gguf_vocab("llama")), ("llama", None)):
        with pytest.raises(ChatFormatError, match="--chat-format"):
            choose_format(arch, tok)
    with pytest.raises(ChatFormatError, match="unknown chat format"):
        choose_format("llama", None, explicit="chatml")
