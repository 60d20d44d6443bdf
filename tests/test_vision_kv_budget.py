"""Image cross-attention keys/values count against the serving engine's KV-cache budget (Llama 3.2 Vision): a
request whose images do not fit beside the running ones waits in the queue, one that can never fit is refused
with an ImageError (a 400 over HTTP), and every block is free again at the end."""

import httpx
import pytest

from llamaherd.engine.sampling import SamplingParams
from llamaherd.engine.scheduler import Engine
from llamaherd.errors import ImageError
from llamaherd.vision_inputs import prepare_images

from .test_vision_serving import IMAGES, tiny_mllama, user


@pytest.fixture(scope="module")
def model():
    return tiny_mllama()


def _prompt(model) -> list[int]:
    tok = model.tokenizer
    return [tok.bos_id, tok.special_id("<|image|>"), *tok.encode(" what is this picture")]


def test_image_blocks_follow_the_cross_attention_cache_size(model):
    engine = Engine(model.net, model.config, num_blocks=64, block_size=4)
    images = prepare_images(model.net, model.tokenizer, _prompt(model), [IMAGES["wide"]])
    ctx = images.encode(model.net)
    held = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in ctx.kv)  # measured
    block = 2 * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim * 4 * 4  # float32 bytes
    assert engine.image_blocks(images) == -(-held // block) > 0


def _run(engine: Engine, requests) -> list[list]:
    outs = [[] for _ in requests]
    for out, (prompt, images) in zip(outs, requests):
        engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), frozenset(),
                      out.append, images=images)
    seen_together = 0
    while engine.waiting or engine.running:
        engine.step()
        seen_together = max(seen_together, len(engine.running))
    return outs, seen_together


def test_a_request_whose_images_do_not_fit_waits_then_runs(model):
    prompt = _prompt(model)
    probe = Engine(model.net, model.config, num_blocks=64, block_size=4)
    images = [prepare_images(model.net, model.tokenizer, prompt, [IMAGES[k]]) for k in ("wide", "tall")]
    image_blocks = probe.image_blocks(images[0])
    text_blocks = -(-(len(prompt) + 4) // 4)
    # Room for one request's text and images, and for both requests' text without their images.
    blocks = image_blocks + text_blocks + 1
    assert 2 * text_blocks <= blocks < 2 * (image_blocks + text_blocks)
    engine = Engine(model.net, model.config, num_blocks=blocks, block_size=4, max_batch=4)
    outs, together = _run(engine, [(prompt, im) for im in images])
    assert together == 1  # the second waited for the first's blocks (text and images)
    assert [o[-1].finish_reason for o in outs] == ["length", "length"]
    assert engine.cache.num_free == engine.cache.num_blocks  # text blocks and image blocks all given back
    roomy = Engine(model.net, model.config, num_blocks=64, block_size=4, max_batch=4)
    fresh = [prepare_images(model.net, model.tokenizer, prompt, [IMAGES[k]]) for k in ("wide", "tall")]
    outs_roomy, together = _run(roomy, [(prompt, im) for im in fresh])
    assert together == 2 and [[t.id for t in o] for o in outs_roomy] == [[t.id for t in o] for o in outs]


def test_images_larger_than_the_whole_cache_are_refused(model):
    prompt = _prompt(model)
    images = prepare_images(model.net, model.tokenizer, prompt, [IMAGES["wide"]])
    probe = Engine(model.net, model.config, num_blocks=64, block_size=4)
    small = Engine(model.net, model.config, num_blocks=probe.image_blocks(images), block_size=4)
    assert small.max_context >= len(prompt)  # the text alone would fit
    with pytest.raises(ImageError, match="KV-cache"):
        small.submit(prompt, SamplingParams(max_tokens=2), frozenset(), lambda t: None, images=images)
    with pytest.raises(ImageError, match="KV-cache"):
        small.check(prompt, SamplingParams(max_tokens=2), 1, images)


def test_over_http_it_is_a_400_and_the_server_keeps_serving(model):
    import torch

    from llamaherd.memory import kv_bytes_per_token
    from llamaherd.server import ServedModel

    from .server_fixtures import LiveServer

    images = prepare_images(model.net, model.tokenizer, _prompt(model), [IMAGES["wide"]])
    blocks = Engine(model.net, model.config, num_blocks=64, block_size=16).image_blocks(images)
    budget = blocks * 16 * kv_bytes_per_token(model.config, torch.float32)  # the images alone fill it
    server = LiveServer(ServedModel(model, "tiny-mllama", kv_cache_bytes=budget, block_size=16))
    try:
        for stream in (False, True):
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
                "messages": user(IMAGES["wide"], "What is it?"), "max_tokens": 2, "stream": stream})
            assert r.status_code == 400 and "KV-cache" in r.json()["error"]["message"], r.text[:300]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text[:300]
    finally:
        server.stop()
