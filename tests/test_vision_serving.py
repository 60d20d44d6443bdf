"""Images through `herd serve`: OpenAI `image_url` parts (data: URLs) and Ollama `images` on /api/chat and
/api/generate, through the continuous-batching engine, for Llama 3.2 Vision (cross-attention) and Llama 4 (early
fusion). The served greedy answer must equal `Model.chat`'s for the same image (the simple generation path, no
paged cache, no batching); requests with different images decode in one batch; equal prompts with different
images never share prefix-cache blocks. Bad input is a 400 and the server keeps serving.

Tiny random-weight models with the official Llama 3 / Llama 4 tokenizers, so the real chat formats run.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from llamaherd.api import Model
from llamaherd.checkpoint.base import Checkpoint
from llamaherd.config import GenerationDefaults, ModelConfig, VisionConfig
from llamaherd.engine.paged import KVCacheManager
from llamaherd.model import build
from llamaherd.server import ServedModel
from llamaherd.tokenizer import Tokenizer

from .server_fixtures import LiveServer, start
from .vision_fixtures import redraw

PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100"
    "c9fe92ef0000000049454e44ae426082")).decode()  # a 1x1 PNG
MAX_TOKENS = 8


def png(w: int, h: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# A 28-pixel tile of 2x2 patches (5 tokens), up to 4 tiles; 2 cross-attention layers over a 4-layer decoder.
MLLAMA = ModelConfig(arch="mllama", dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     rope_theta=500000.0, max_seq_len=2048,
                     vision=VisionConfig(image_size=28, patch_size=14, max_num_tiles=4, width=32, n_layers=3,
                                         n_global_layers=1, n_heads=4, intermediate_layers=(1,),
                                         n_cross_attention_layers=2))


def tiny_model(config: ModelConfig, tok: Tokenizer, name: str, stop: str) -> Model:
    torch.manual_seed(0)
    net = redraw(build(config), seed=5, std=0.3)
    ckpt = Checkpoint(config, {}, Path(name), tokenizer=tok,
                      generation=GenerationDefaults(eos_token_ids=(tok.special_id(stop),)))
    return Model(net, ckpt)


def tiny_mllama() -> Model:
    return tiny_model(MLLAMA, Tokenizer.llama3(), "tiny-mllama", "<|eot_id|>")


def tiny_llama4() -> Model:
    from .test_vision_llama4 import _tiny_llama4

    _, config = _tiny_llama4()
    return tiny_model(config.replace(vocab_size=202048, max_seq_len=1024), Tokenizer.llama4(), "tiny-llama4",
                      "<|eot|>")


def serve(model: Model, **engine) -> tuple[LiveServer, ServedModel]:
    # Small prefill chunks: a prompt's image tokens are split across chunks, as long prompts are.
    served = ServedModel(model, model.checkpoint.source.name, kv_cache_bytes=16 << 20, prefill_chunk=8, **engine)
    return LiveServer(served), served


def user(image: bytes, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": text}]}]


def expected(model: Model, image: bytes, text: str) -> str:
    """Model.chat's greedy answer (the simple path: the images bound to the model, one sequence, no paging)."""
    return "".join(model.chat(user(image, text), stream=True, max_tokens=MAX_TOKENS, temperature=0))


@pytest.fixture(scope="module", params=["mllama", "llama4"])
def vision(request):
    model = tiny_mllama() if request.param == "mllama" else tiny_llama4()
    server, served = serve(model)
    yield model, server, served
    server.stop()


IMAGES = {"wide": png(60, 25, 1), "tall": png(20, 70, 2), "small": png(9, 9, 3)}
TEXT = "Describe the picture in a few words, please."


def test_openai_client_image_url_equals_model_chat(vision):
    openai = pytest.importorskip("openai")
    model, server, served = vision
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answers = {}
    for name, image in IMAGES.items():
        reply = client.chat.completions.create(model=served.name, messages=user(image, TEXT), max_tokens=MAX_TOKENS,
                                               temperature=0)
        answers[name] = reply.choices[0].message.content
        assert answers[name] == expected(model, image, TEXT), name
    assert len(set(answers.values())) > 1  # the image changes the answer: the test can see a wrong image
    stream = client.chat.completions.create(model=served.name, messages=user(IMAGES["wide"], TEXT), stream=True,
                                            max_tokens=MAX_TOKENS, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answers["wide"]
    # n = 2: two sequences of one request share its encoded images and decode together.
    reply = client.chat.completions.create(model=served.name, messages=user(IMAGES["small"], TEXT), n=2,
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert [c.message.content for c in reply.choices] == [answers["small"]] * 2


def test_ollama_client_images_equal_model_chat(vision):
    ollama = pytest.importorskip("ollama")
    model, server, served = vision
    client = ollama.Client(host=server.url, timeout=120)
    image = IMAGES["tall"]
    want = expected(model, image, TEXT)
    options = {"num_predict": MAX_TOKENS, "temperature": 0}
    reply = client.chat(model=served.name, messages=[{"role": "user", "content": TEXT, "images": [image]}],
                        options=options)
    assert reply.message.content == want
    # /api/generate wraps the prompt in the chat format, its images ahead of the text, as /api/chat does.
    assert client.generate(model=served.name, prompt=TEXT, images=[image], options=options).response == want


def test_concurrent_requests_with_different_images_batch_together(vision):
    """Three requests at once (two images, and one text-only) decode in shared engine steps; each answer is the
    one Model.chat gives alone. The same text with other images after them reuses no cached block."""
    model, server, served = vision
    jobs = [user(IMAGES["wide"], TEXT), user(IMAGES["small"], TEXT), [{"role": "user", "content": TEXT}]]
    want = [expected(model, IMAGES["wide"], TEXT), expected(model, IMAGES["small"], TEXT),
            "".join(model.chat(jobs[2], stream=True, max_tokens=MAX_TOKENS, temperature=0))]

    async def ask(messages):
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            r = await client.post("/v1/chat/completions", json={"model": served.name, "messages": messages,
                                                                "max_tokens": MAX_TOKENS, "temperature": 0})
            assert r.status_code == 200, r.text[:300]
            return r.json()["choices"][0]["message"]["content"]

    async def all_at_once():
        return await asyncio.gather(*(ask(m) for m in jobs))

    peak = served.engine.stats["peak_decode_batch"]
    assert asyncio.run(all_at_once()) == want
    assert served.engine.stats["peak_decode_batch"] >= max(peak, 2)
    # The same prompt again with an image not sent before: its blocks are not the earlier requests' blocks.
    hits, new = served.engine.stats["prefix_hit_tokens"], png(33, 47, 9)
    assert asyncio.run(ask(user(new, TEXT))) == expected(model, new, TEXT)
    assert served.engine.stats["prefix_hit_tokens"] == hits  # a full block of equal tokens, but other images
    assert asyncio.run(ask(user(new, TEXT))) == expected(model, new, TEXT)
    assert served.engine.stats["prefix_hit_tokens"] > hits  # the same image again does reuse its blocks


def test_prefix_cache_keys_include_the_image_digest():
    cache = KVCacheManager(MLLAMA, num_blocks=8, block_size=4, dtype=torch.float32)
    tokens = list(range(13))
    assert cache.take_prefix(0, tokens, salt=11) == 0
    cache.reserve(0, 12)
    cache.register(0, tokens, 12)
    cache.release(0)
    assert cache.take_prefix(1, tokens, salt=11) == 12  # same tokens, same images
    assert cache.take_prefix(2, tokens, salt=12) == 0  # same tokens, other images
    assert cache.take_prefix(3, tokens) == 0  # same tokens, no images


@pytest.mark.parametrize("path,body,message", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "remote image URLs are refused"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}, "data:image"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]}, "data:image"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, "base64 payload is malformed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image", "image": "/etc/hostname"}]}]}, "image_url"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, "image"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png(8, 8, 1))}}] * 9}]}, "at most 8"),
    ("/api/chat", {"stream": False, "messages": [{"role": "user", "content": "hi", "images": ["not base64!"]}]},
     "base64"),
    ("/api/generate", {"stream": False, "prompt": "hi", "images": [base64.b64encode(b"garbage").decode()]},
     "not a readable image"),
])
def test_bad_images_get_a_400_and_the_server_keeps_serving(vision, path, body, message):
    model, server, served = vision
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post(path, json={"model": served.name, **body})
        assert r.status_code == 400, r.text[:300]
        assert message in r.json()["error"]["message"]
        ok = client.post("/v1/chat/completions", json={"model": served.name, "max_tokens": 2, "messages":
                                                       user(IMAGES["small"], "hi")})
        assert ok.status_code == 200


# -- a text-only model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live():
    server, served = start()
    yield server
    server.stop()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "tiny-llama3", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "text", "text": "what is this?"}]}]}),
    ("/v1/chat/completions", {"model": "tiny-llama3", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}),
    ("/api/chat", {"model": "tiny-llama3", "stream": False, "options": {"num_predict": 2},
                   "messages": [{"role": "user", "content": "what is this?", "images": [PNG]}]}),
    ("/api/generate", {"model": "tiny-llama3", "stream": False, "prompt": "what is this?", "images": [PNG],
                       "options": {"num_predict": 2}}),
])
def test_images_for_a_text_only_model_get_a_400(live, path, body):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        r = client.post(path, json=body)
        assert r.status_code == 400, r.text[:300]
        assert "image" in r.json()["error"]["message"]
        ok = client.post("/v1/chat/completions", json={"model": "tiny-llama3", "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200


def test_penalties_skip_the_input_only_image_token():
    """Hugging Face's Llama 3.2 Vision tokenizer writes <|image|> as 128256, the first id past the output
    vocabulary (an input-only embedding): a repetition or frequency penalty over a prompt holding it counts the
    other tokens as before and does not fail (it did: an index error in the engine step, failing every sequence)."""
    from llamaherd.engine.sampling import Sampler, SamplingParams

    V = 128256
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5)
    with_image = Sampler(params, V)(logits.clone(), [[128000, V, 40, 41, 40]], [[40]])
    without = Sampler(params, V)(logits.clone(), [[128000, 40, 41, 40]], [[40]])
    assert torch.equal(with_image.tokens, without.tokens)


def test_speculation_and_preemption_keep_each_sequence_its_images():
    """The engine alone, with n-gram speculation and a cache too small for three image requests at once (so
    sequences are preempted and recomputed): each answer is still Model.chat's for its own image."""
    model = tiny_mllama()
    per_block = 2 * MLLAMA.n_layers * MLLAMA.n_kv_heads * MLLAMA.head_dim * 4 * 16  # float32, 16-token blocks
    served = ServedModel(model, "m", kv_cache_bytes=5 * per_block, prefill_chunk=8, speculative="ngram")
    served.start()
    fmt = model.chat_format(images=True)

    async def ask(image: bytes) -> str:
        prompt = fmt.encode_dialog(user(image, TEXT), add_generation_prompt=True)
        prepared = await served.prepare_images(prompt, [data_url(image)])
        params = model.sampling_params(max_tokens=2 * MAX_TOKENS, temperature=0)
        return (await served.complete(prompt, params, images=prepared))[0]

    async def all_at_once():
        return await asyncio.gather(*(ask(i) for i in IMAGES.values()))

    try:
        got = asyncio.run(all_at_once())
    finally:
        served.shutdown()
    assert got == ["".join(model.chat(user(i, TEXT), stream=True, max_tokens=2 * MAX_TOKENS, temperature=0))
                   for i in IMAGES.values()]
    assert served.engine.stats["preemptions"] > 0 and served.engine.stats["spec_accepted"] > 0


def test_raw_generate_with_images(vision):
    """A raw /api/generate with an image: on Llama 3.2 Vision, BOS, <|image|>, the text (as `herd run --raw`),
    completed as Model.generate completes it; Llama 4 lays each image out by its size in its chat format, so a raw
    prompt cannot place it: a 400."""
    ollama = pytest.importorskip("ollama")
    model, server, served = vision
    client = ollama.Client(host=server.url, timeout=120)
    image, options = IMAGES["wide"], {"num_predict": MAX_TOKENS, "temperature": 0}
    if model.config.arch == "mllama":
        got = client.generate(model=served.name, prompt="A picture of", images=[image], raw=True, options=options)
        ids = model.encode_prompt("A picture of")
        assert got.response == model.generate([ids[0], model.tokenizer.special_id("<|image|>")] + ids[1:],
                                              images=[image], max_tokens=MAX_TOKENS, temperature=0)
    else:
        with pytest.raises(ollama.ResponseError, match="without raw") as err:
            client.generate(model=served.name, prompt="A picture of", images=[image], raw=True, options=options)
        assert err.value.status_code == 400
