"""Training data: chat rendering with assistant-only loss masks, record shapes, batching, packing, bad input."""

from __future__ import annotations

import pytest
import torch

from llamaherd.chat import get_format
from llamaherd.errors import DatasetError
from llamaherd.train.data import (IGNORE, Renderer, collate, epoch_batches, load_examples, pack, read_jsonl,
                                  segment_mask, show, split)

from .chat_fixtures import ours, reference_format, to_raw
from .train_fixtures import write_jsonl


@pytest.fixture(scope="module")
def llama3():
    tok = ours("llama3")
    return Renderer(tok, get_format("llama3", tok), max_len=4096)


def _trained_ids(ex):
    return [t for t, m in zip(ex.ids, ex.trained) if m]


def test_chat_mask_is_exactly_the_assistant_turns_of_metas_encoding(llama3):
    """Ids equal Meta's ChatFormat encoding of the dialog; the trained ids are each assistant message as Meta encodes
    it without its header (content + <|eot_id|>), and nothing else."""
    tok = ours("llama3")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, of course."}]
    ex = llama3.render({"messages": msgs}, "x:1")
    ref = reference_format("llama3")
    meta_ids = []
    for m in to_raw(msgs):
        meta_ids += ref.encode_message(m, tool_prompt_format=None)[0]
    assert ex.ids == [tok.bos_id] + meta_ids
    header = ref._encode_header("assistant")
    expected = []
    for m in to_raw(msgs):
        if m.role == "assistant":
            expected += ref.encode_message(m, tool_prompt_format=None)[0][len(header):]
    assert _trained_ids(ex) == expected
    assert tok.decode(_trained_ids(ex)) == "4<|eot_id|>6, of course.<|eot_id|>"


def test_tool_calls_are_trained_and_tool_results_are_not(llama3):
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
            {"role": "assistant", "content": "Sunny and 21C."}]
    ex = llama3.render({"messages": msgs, "tools": tools}, "x:1")
    trained = ours("llama3").decode(_trained_ids(ex))
    assert '"name": "weather"' in trained and "Paris" in trained and trained.endswith("Sunny and 21C.<|eot_id|>")
    assert "sunny, 21C" not in trained and "Weather in Paris?" not in trained
    assert "sunny, 21C" in ours("llama3").decode(ex.ids)


def test_prompt_completion_text_and_preference_shapes(llama3):
    tok = ours("llama3")
    pc = llama3.render({"prompt": "The sky is", "completion": " blue."}, "x:1")
    assert pc.ids == [tok.bos_id] + tok.encode("The sky is") + tok.encode(" blue.") + [tok.eos_id]
    assert tok.decode(_trained_ids(pc)) == " blue." + tok.decode([tok.eos_id])
    text = llama3.render({"text": "hello world"}, "x:2")
    assert text.trained == [False] + [True] * (len(text) - 1)
    conv = llama3.render({"prompt": [{"role": "user", "content": "hi"}],
                          "completion": [{"role": "assistant", "content": "hello"}]}, "x:3")
    assert tok.decode(_trained_ids(conv)) == "hello<|eot_id|>"
    pair = llama3.render_preference({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, "x:4")
    n = len(tok.encode("Q:")) + 1
    assert pair.chosen.ids[:n] == pair.rejected.ids[:n] and not any(pair.chosen.trained[:n])


def test_dry_run_marks_trained_spans(llama3):
    ex = llama3.render({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "f:1")
    text = show(ex, ours("llama3"))
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n[[yo<|eot_id|>]]")
    assert text.count("[[") == 1


def test_bad_input_names_file_and_line(tmp_path, llama3):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "{not json", {"text": "ok"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: not valid JSON"):
        read_jsonl(f)
    f = write_jsonl(tmp_path / "e.jsonl", [{"text": "ok"}, "[1, 2]"])
    with pytest.raises(DatasetError, match=r"e\.jsonl:2: expected a JSON object"):
        read_jsonl(f)
    f = write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DatasetError, match=r"n\.jsonl:1: no assistant turn"):
        load_examples(f, llama3)
    short = Renderer(ours("llama3"), None, max_len=8)
    f = write_jsonl(tmp_path / "l.jsonl", [{"text": "a"}, {"text": "word " * 50}])
    with pytest.raises(DatasetError, match=r"l\.jsonl:2: example is \d+ tokens, longer than the context of 8"):
        load_examples(f, short)
    f = write_jsonl(tmp_path / "u.jsonl", [{"input": "x"}])
    with pytest.raises(DatasetError, match=r"u\.jsonl:1: unknown record shape"):
        load_examples(f, llama3)
    with pytest.raises(DatasetError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DatasetError, match="no chat format"):
        load_examples(f, short)


def test_labels_are_next_tokens_of_trained_positions(llama3):
    ex = llama3.render({"prompt": "a", "completion": "b"}, "x:1")
    b = collate([ex, llama3.render({"text": "longer text here"}, "x:2")])
    row = b.labels[0, : len(ex)].tolist()
    for t in range(len(ex) - 1):
        assert row[t] == (ex.ids[t + 1] if ex.trained[t + 1] else IGNORE)
    assert (b.labels[0, len(ex) - 1 :] == IGNORE).all()  # last real token and the padding predict nothing


def test_bucketing_is_seeded_and_covers_every_example():
    lengths = [5, 50, 7, 48, 6, 49, 8, 51, 9, 47] * 4
    a = epoch_batches(lengths, 4, seed=1, epoch=0, bucket=2)
    assert a == epoch_batches(lengths, 4, seed=1, epoch=0, bucket=2)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=1, bucket=2)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a)
    shuffled = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch_batches(lengths, 4, 1, 0, 1))
    assert spread < shuffled


def test_split_holds_out_a_seeded_fraction():
    train, val = split(list(range(20)), 0.1, seed=3)
    assert len(val) == 2 and sorted(train + val) == list(range(20))
    assert split(list(range(20)), 0.1, seed=3) == (train, val)


def test_packing_resets_positions_and_blocks_attention(llama3):
    exs = [llama3.render({"text": t}, f"x:{i}") for i, t in enumerate(["one two", "three", "four five six", "s"])]
    b = pack(exs, max_len=16)
    assert b.tokens.shape[0] < len(exs)
    mask = segment_mask(b.segments)
    for r in range(b.tokens.shape[0]):
        seg = b.segments[r]
        for s in seg.unique().tolist():
            if s == 0:
                continue
            where = (seg == s).nonzero().flatten()
            assert b.positions[r, where].tolist() == list(range(len(where)))
            assert mask[r][where][:, seg != s].sum() == 0  # never sees another example's tokens
    assert int((b.labels != IGNORE).sum()) == sum(sum(e.trained[1:]) for e in exs)
    assert b.tokens.dtype == torch.long
