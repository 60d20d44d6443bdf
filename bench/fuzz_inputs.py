"""Fuzz targets beyond the checkpoint headers: Meta .pth zips, tokenizer files, chat templates, tool-call
outputs, images, and OpenAI / Ollama request bodies. bench/fuzz_loaders.py runs them.

Each target is (make the valid input in a folder, the file to mutate, a mutation, what a user's call does
with the file). What that call may do: succeed, or raise a typed LlamaherdError (for HTTP bodies: answer
2xx or 4xx). Anything else is a crash.
"""

from __future__ import annotations

import copy
import io
import json
import random
import struct
from functools import lru_cache
from pathlib import Path

import torch

from llamaherd.config import ModelConfig

TINY = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=32)
TEXT = "Hello, world! 123 héllo 字語 😀 <|eot_id|> <s>\n\ttabs  and  spaces"
INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"{", b"}", b"[", b"\"",
               b"\\", b"\n", b"%", b"{{", b"}}", b"{%", b"%}", b"9" * 20, b"-1", b"nan", b"null"]


# ---- mutations ---------------------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Havoc in the style of AFL: a few byte flips, interesting values, chunk deletions, duplications, splices."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not b:
            b += rng.choice(INTERESTING)
            continue
        kind, i = rng.randrange(7), rng.randrange(len(b))
        if kind == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[i] = rng.randrange(256)
        elif kind == 2:
            v = rng.choice(INTERESTING)
            b[i:i + len(v)] = v
        elif kind == 3:
            del b[i:i + rng.randint(1, 64)]
        elif kind == 4:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 256)]
        elif kind == 5:
            del b[i:]
        else:
            b[i:i] = rng.choice(INTERESTING) * rng.randint(1, 1000)
    return bytes(b)


def mutate_lines(data: bytes, rng: random.Random) -> bytes:
    """Line-level mutation of a text file (a tiktoken ranks file): lines dropped, duplicated, swapped or havocked."""
    lines = data.split(b"\n")
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        kind = rng.randrange(5)
        if kind == 0:
            del lines[i]
        elif kind == 1:
            lines.insert(rng.randrange(len(lines)), lines[i])
        elif kind == 2:
            token, _, rank = lines[i].partition(b" ")
            lines[i] = token + b" " + rng.choice([b"-1", b"x", b"", b"99999999999999999999", rank + rank, b"0"])
        elif kind == 3:
            lines[i] = mutate_bytes(lines[i], rng)
        else:
            return mutate_bytes(data, rng)
    return b"\n".join(lines)


def mutate_json_values(data: bytes, rng: random.Random) -> bytes:
    """JSON with values anywhere in the tree replaced by ones of the wrong kind, removed, or the text havocked."""
    if rng.random() < 0.2:
        return mutate_bytes(data, rng)
    obj = json.loads(data)
    odd = [None, True, 0, -1, 2**63, 1e308, "", "x" * 10_000, [], [None], {}, {"a": []}, "<|eot_id|>", -0.0]
    for _ in range(rng.randint(1, 4)):
        node, key = _random_slot(obj, rng)
        if node is None:
            obj = copy.deepcopy(rng.choice(odd))
            break
        if rng.random() < 0.2 and isinstance(node, dict):
            node.pop(key, None)
        else:
            node[key] = copy.deepcopy(rng.choice(odd))  # a fresh value: never one the tree already holds
    return json.dumps(obj).encode()


def _random_slot(obj, rng: random.Random):
    """A random (container, key) inside a JSON tree, walking down a few levels."""
    node, key = None, None
    cur = obj
    for _ in range(rng.randint(1, 6)):
        if isinstance(cur, dict) and cur:
            node, key = cur, rng.choice(list(cur))
        elif isinstance(cur, list) and cur:
            node, key = cur, rng.randrange(len(cur))
        else:
            break
        cur = node[key]
    return node, key


TEMPLATE_PIECES = [
    "{{ messages }}", "{% for m in messages %}{{ m.content }}{% endfor %}", "{{ messages[0]['content'] * 100000 }}",
    "{% for i in range(10**9) %}x{% endfor %}", "{{ ''.__class__.__mro__ }}", "{{ raise_exception('no') }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ messages|tojson }}", "{{ tools|tojson(indent=2) }}",
    "{% set x = namespace(a=1) %}{{ x.a }}", "{{ 'a' ~ bos_token }}", "{{ (1,2)|join }}", "{{ 1/0 }}",
    "{{ strftime_now('%Y') }}", "{% if add_generation_prompt %}<|start|>{% endif %}", "{{ undefined.attr }}",
    "{{ messages|length * 'ab' * 99999999 }}", "{% for a in messages %}{% for b in messages %}{% endfor %}{% endfor %}",
    "{{ 9**9**9 }}", "{{ lipsum(10**6) }}", "{{ cycler(1,2).next() }}", "{{ '%s' % messages }}", "{%", "}}", "{{",
    "{% endfor %}", "{{ messages.pop() }}", "{{ range(2**62)|list }}", "{{ [0]*10**8 }}",
]


def mutate_template(data: bytes, rng: random.Random) -> bytes:
    """A chat template with hostile Jinja spliced in, pieces removed, or its text havocked."""
    t = data.decode()
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        i = rng.randrange(len(t) + 1)
        if r < 0.6:
            t = t[:i] + rng.choice(TEMPLATE_PIECES) + t[i:]
        elif r < 0.8:
            t = t[:i] + t[i + rng.randint(1, 40):]
        else:
            t = mutate_bytes(t.encode(), rng).decode("utf-8", "replace")
    return t.encode()


# ---- valid inputs ------------------------------------------------------------------------------------------------


def meta_pth_folder(root: Path) -> Path:
    """A tiny Meta folder; mutate_bytes reaches the .pth zip's local headers, central directory and pickle."""
    from bench.fuzz_folders import meta_folder

    return meta_folder(root)


def tiktoken_file(root: Path) -> Path:
    """The official Llama 3 tokenizer.model (tiktoken ranks, from the installed llama_models package)."""
    from importlib import resources

    root.mkdir(parents=True, exist_ok=True)
    src = resources.files("llama_models.llama3") / "tokenizer.model"
    (root / "tokenizer.model").write_bytes(src.read_bytes())
    return root


def hf_tokenizer_folder(root: Path) -> Path:
    """A small BPE tokenizer.json (byte level, trained here by the tokenizers library) + tokenizer_config.json."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(100)]
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)],
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text(tk.to_str())
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return root


def spm_file(root: Path) -> Path:
    """A small SentencePiece BPE model with byte fallback, trained here."""
    import sentencepiece

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 7))) for _ in range(200)]
    root.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(words) for _ in range(10)) for _ in range(500)]),
        model_prefix=str(root / "tokenizer"), model_type="bpe", vocab_size=300, byte_fallback=True,
        minloglevel=2)
    return root


LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def template_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "template.jinja").write_text(LLAMA3_STYLE_TEMPLATE)
    return root


TOOL_OUTPUTS = [
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}<|eom_id|>',
    '[get_weather(city="Paris", days=3), lookup(q={"a": [1, 2.5, None, True]})]<|eot_id|>',
    '<function=spotify_trending_songs>{"n": "5"}</function><|eot_id|>',
    '{"type": "function", "name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": "y"}}<|eot_id|>',
]


def tool_output_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "output.txt").write_text("\n".join(TOOL_OUTPUTS))
    return root


def image_folder(root: Path) -> Path:
    """A PNG with alpha and a JPEG with EXIF orientation, concatenated with a length prefix each."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    blobs = []
    for fmt, mode in (("PNG", "RGBA"), ("JPEG", "RGB")):
        im = Image.new(mode, (37, 23), (10, 200, 30, 128)[: len(mode)])
        buf = io.BytesIO()
        if fmt == "JPEG":
            exif = Image.Exif()
            exif[0x0112] = 6
            im.save(buf, fmt, exif=exif.tobytes())
        else:
            im.save(buf, fmt)
        blobs.append(buf.getvalue())
    (root / "image.bin").write_bytes(pack_blobs(blobs))
    return root


def pack_blobs(blobs: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


OPENAI_BODY = {"model": "fuzz", "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
               "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "seed": 1, "stream": False,
               "logit_bias": {"5": 1.0}, "n": 1, "logprobs": True, "top_logprobs": 2,
               "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
               "response_format": {"type": "json_object"}}
OLLAMA_BODY = {"model": "fuzz", "messages": [{"role": "user", "content": "hi", "images": []}], "stream": False,
               "options": {"num_predict": 3, "temperature": 0.5, "top_k": 5, "stop": ["x"], "num_ctx": 32},
               "format": "json", "keep_alive": "5m"}


def body_folder(body: dict, route: str):
    def make(root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        (root / "body.json").write_text(json.dumps(body))
        r = _client().post(route, json=body)  # warm-up, untimed: the JSON grammar's index is built on first use
        if r.status_code != 200:
            raise RuntimeError(f"the valid body is refused: {r.status_code} {r.text[:300]}")
        return root
    return make


# ---- what a user's call does with each ---------------------------------------------------------------------------


def load_pth(folder: Path) -> None:
    from bench.fuzz_folders import load_folder

    load_folder(folder)


def use_tokenizer(path: Path) -> None:
    from llamaherd.tokenizer import Tokenizer

    tok = Tokenizer.from_file(path)
    ids = tok.encode(TEXT, bos=tok.bos_id is not None)
    tok.decode(ids)
    tok.decode([i for i in range(0, tok.vocab_size, max(1, tok.vocab_size // 50))])


def tiktoken_use(folder: Path) -> None:
    use_tokenizer(folder / "tokenizer.model")


def hf_tokenizer_use(folder: Path) -> None:
    use_tokenizer(folder / "tokenizer.json")


def spm_use(folder: Path) -> None:
    use_tokenizer(folder / "tokenizer.model")


@lru_cache(maxsize=1)
def _llama3_tokenizer():
    from llamaherd.tokenizer import Tokenizer

    return Tokenizer.llama3()


MESSAGES = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "content": "42"}, {"role": "user", "content": [{"type": "text", "text": "again"}]}]


def render_template(folder: Path) -> None:
    from llamaherd.chat import get_format

    template = (folder / "template.jinja").read_bytes().decode("utf-8", "replace")
    fmt = get_format("hf", _llama3_tokenizer(), template=template)
    fmt.encode_dialog(MESSAGES, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                      add_generation_prompt=True)


def parse_tool_output(folder: Path) -> None:
    from llamaherd.chat import get_format

    text = (folder / "output.txt").read_bytes().decode("utf-8", "replace")
    for name in ("llama3", "llama3.2", "llama4"):
        tok = _llama3_tokenizer() if name != "llama4" else _llama4_tokenizer()
        msg = get_format(name, tok).parse_assistant(text)
        json.dumps(msg)  # what the server does with it next


@lru_cache(maxsize=1)
def _llama4_tokenizer():
    from llamaherd.tokenizer import Tokenizer

    return Tokenizer.llama4()


def read_images(folder: Path) -> None:
    from llamaherd.image import llama4_tiles, load_image, mllama_tiles

    data = (folder / "image.bin").read_bytes()
    while len(data) >= 4:
        (n,) = struct.unpack("<I", data[:4])
        blob, data = data[4:4 + n], data[4 + n:]
        image = load_image(blob)
        mllama_tiles(image, 56, 4)
        llama4_tiles(load_image(blob, background=(255, 255, 255)), 56, 4)


_CLIENT = None


def _client():
    """One in-process app around a tiny random-weight Llama 3 (official tokenizer), kept for the whole run."""
    global _CLIENT
    if _CLIENT is None:
        from fastapi.testclient import TestClient

        from llamaherd.api import Model
        from llamaherd.checkpoint.base import Checkpoint
        from llamaherd.config import GenerationDefaults
        from llamaherd.model import build
        from llamaherd.server import ServedModel, create_app

        torch.manual_seed(0)
        config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256, multiple_of=16,
                             rope_theta=500000.0, max_seq_len=512)
        tok = _llama3_tokenizer()
        ckpt = Checkpoint(config, {}, Path("fuzz"), tokenizer=tok,
                          generation=GenerationDefaults(eos_token_ids=(tok.special_id("<|eot_id|>"),)))
        # A 200-token context: a body without max_tokens generates at most ~60 tokens (the prompt with a tool is
        # ~140), so the time limit meets only real hangs, not long answers on a loaded machine.
        served = ServedModel(Model(build(config).eval(), ckpt), "fuzz", kv_cache_bytes=4 << 20, max_context=200)
        _CLIENT = TestClient(create_app(served), raise_server_exceptions=True)
        _CLIENT.__enter__()
    return _CLIENT


def post(route: str):
    def consume(folder: Path) -> None:
        from llamaherd.errors import LlamaherdError

        body = (folder / "body.json").read_bytes()
        r = _client().post(route, content=body, headers={"content-type": "application/json"})
        if r.status_code >= 500:
            raise AssertionError(f"HTTP {r.status_code}: {r.text[:300]}")
        if r.status_code >= 400:
            raise LlamaherdError(f"HTTP {r.status_code}")  # counted as rejected: the typed answer over HTTP
    return consume


OPENAI_ROUTE, OLLAMA_ROUTE = "/v1/chat/completions", "/api/chat"
TARGETS = {  # name -> (make the valid folder, file to mutate, mutation, what a user's call does)
    "meta_pth": (meta_pth_folder, "consolidated.00.pth", mutate_bytes, load_pth),
    "tokenizer_model": (tiktoken_file, "tokenizer.model", mutate_lines, tiktoken_use),
    "tokenizer_json": (hf_tokenizer_folder, "tokenizer.json", mutate_json_values, hf_tokenizer_use),
    "sentencepiece": (spm_file, "tokenizer.model", mutate_bytes, spm_use),
    "chat_template": (template_folder, "template.jinja", mutate_template, render_template),
    "tool_calls": (tool_output_folder, "output.txt", mutate_bytes, parse_tool_output),
    "images": (image_folder, "image.bin", mutate_bytes, read_images),
    "openai_body": (body_folder(OPENAI_BODY, OPENAI_ROUTE), "body.json", mutate_json_values, post(OPENAI_ROUTE)),
    "ollama_body": (body_folder(OLLAMA_BODY, OLLAMA_ROUTE), "body.json", mutate_json_values, post(OLLAMA_ROUTE)),
}

__all__ = ["TARGETS", "mutate_bytes"]
