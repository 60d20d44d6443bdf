"""Llama Guard 3 11B Vision moderates conversations with an image: the prompt is the official template's (one
<|image|> before the task line), the image is bound as the engine's vision path binds it, and the single and
batched (continuous-batching engine) paths give the same verdict and score. A tiny random-weight mllama model
whose answer is forced by weight edits (as tests/guard_fixtures.py does for the text releases)."""

from pathlib import Path

import pytest
import torch

from llamaherd.api import Model
from llamaherd.checkpoint.base import Checkpoint
from llamaherd.config import GenerationDefaults
from llamaherd.errors import ImageError, LlamaherdError
from llamaherd.guard import LlamaGuard
from llamaherd.guard.batched import BatchedLlamaGuard
from llamaherd.guard.llama_guard import image_inputs
from llamaherd.guard.prompt import GuardError
from llamaherd.model import build
from llamaherd.tokenizer import Tokenizer

from .test_guard_prompt import DATA, _official_ids
from .test_vision_serving import MLLAMA, data_url, png
from .vision_fixtures import redraw


def forced_vision_guard(answer: str, split: float) -> Model:
    """A tiny mllama Llama Guard answering `answer` after the assistant header; the first word's step gives
    'unsafe' and 'safe' logits about `split` apart, the rest of the residual (cross-attention to the image
    included) moving them a little, so the score depends on the image."""
    tok = Tokenizer.llama3()
    net = redraw(build(MLLAMA), seed=3, std=0.02)
    chain = [tok.special_id("<|end_header_id|>")] + tok.encode("\n\n" + answer) + [tok.special_id("<|eot_id|>")]
    text = net.text_model
    with torch.no_grad():
        emb, out = text.tok_embeddings.weight, text.output.weight
        for k, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            emb[cur] = 0.0
            emb[cur, k] = 10.0
            out[nxt, k] = 50.0
        safe, unsafe = tok.encode("safe")[0], tok.encode("unsafe")[0]
        out[safe, 1], out[unsafe, 1] = 50.0, 50.0 + split
        for block in text.cross_attention_layers:  # what the image adds to the residual: visible in the score
            block.attention.wv.weight *= 30
            block.attention.wo.weight *= 30
    ckpt = Checkpoint(MLLAMA, {}, Path("forced-vision-guard"), tokenizer=tok,
                      generation=GenerationDefaults(eos_token_ids=(tok.special_id("<|eot_id|>"),)),
                      chat_template=(DATA / "llama-guard-3-1b.jinja").read_text())
    return Model(net, ckpt)


@pytest.fixture(scope="module")
def guard():
    return LlamaGuard(forced_vision_guard("unsafe\nS1", split=0.5))


def conversation(image: bytes, text: str = "Is this picture fine to share?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": text}]}]


IMAGES = [png(60, 25, 1), png(20, 70, 2)]


def test_the_release_is_3_11b_vision_and_the_prompt_is_the_official_templates(guard):
    assert guard.release.name == "llama-guard-3-11b-vision"
    messages, images = image_inputs(conversation(IMAGES[0]))
    assert images == [data_url(IMAGES[0])]
    official = _official_ids("llama-guard-3-1b", [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Is this picture fine to share?"}]}])
    ids = guard.encode(messages)
    assert ids == official and ids.count(guard.model.tokenizer.special_id("<|image|>")) == 1


def test_moderation_with_an_image_single_and_batched_agree(guard):
    batched = BatchedLlamaGuard(guard, max_batch=4, context_tokens=2048)
    try:
        single = [guard.moderate(conversation(im)) for im in IMAGES]
        both = [batched.moderate(conversation(im)) for im in IMAGES]
    finally:
        batched.close()
    for s, b in zip(single, both):
        assert s.status == b.status == "unsafe" and s.categories == b.categories == ("S1",)
        assert s.score == pytest.approx(b.score, abs=1e-4)
    assert abs(single[0].score - single[1].score) > 1e-4  # the image reaches the model: scores differ by image
    # The score is the image-bound model's own first-token probability (Model.logits with the image).
    ids = guard.encode(image_inputs(conversation(IMAGES[0]))[0])
    tok = guard.model.tokenizer
    logits = guard.model.logits(ids + tok.encode("\n\n"), images=[IMAGES[0]])[-1]  # the step that picks 'unsafe'
    assert single[0].score == pytest.approx(float(torch.softmax(logits.double(), -1)[tok.encode("unsafe")[0]]),
                                            abs=1e-5)


def test_bad_image_inputs_are_typed_errors(guard):
    two = conversation(IMAGES[0])
    two[0]["content"].insert(0, {"type": "image_url", "image_url": {"url": data_url(IMAGES[1])}})
    with pytest.raises(GuardError, match="one <\\|image\\|>"):
        guard.moderate(two)
    with pytest.raises(ImageError):
        guard.moderate([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
    with pytest.raises(ImageError):
        guard.moderate(conversation(b"not an image at all"))
    with pytest.raises(LlamaherdError):  # a text-only guard refuses images
        from .guard_fixtures import forced_guard

        LlamaGuard(forced_guard("safe"), "llama-guard-3-1b").moderate(conversation(IMAGES[0]))


def test_v1_moderations_with_an_image_part_through_the_openai_client(guard):
    import httpx
    import openai

    from llamaherd.guard.shield import Shields
    from llamaherd.server.moderations import install

    from . import server_fixtures
    from .guard_fixtures import forced_guard

    live, _ = server_fixtures.start()
    batched = BatchedLlamaGuard(guard, max_batch=4, context_tokens=2048)
    install(live.server.config.app, Shields(guard=batched), "tiny-vision-guard")
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        parts = [{"type": "text", "text": "Is this picture fine to share?"},
                 {"type": "image_url", "image_url": {"url": data_url(IMAGES[1])}}]
        result = client.moderations.create(input=parts, model="tiny-vision-guard").results[0]
        assert result.flagged and result.categories.violence
        assert result.category_applied_input_types.model_dump(by_alias=True)["violence"] == ["text", "image"]
        assert result.model_extra["llama_guard"]["score"] == pytest.approx(guard.moderate(conversation(IMAGES[1])).score,
                                                                             abs=1e-4)
        bad = httpx.post(f"{live.url}/v1/moderations", json={"input": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AAAA"}}]}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["message"]  # not an image: a 400, serving goes on
    finally:
        live.stop()
        batched.close()
    live, _ = server_fixtures.start()  # a text-only guard refuses an image input with a 400 naming the release
    install(live.server.config.app, Shields(guard=LlamaGuard(forced_guard("safe"), "llama-guard-3-8b")), "tiny-guard")
    try:
        r = httpx.post(f"{live.url}/v1/moderations", json={"input": parts}, timeout=60)
        assert r.status_code == 400 and "reads text only" in r.json()["error"]["message"]
    finally:
        live.stop()


def test_herd_guard_image_flag(guard, tmp_path, capsys):
    import json

    import shutil
    from importlib import resources

    from llamaherd.checkpoint.save import save
    from llamaherd.cli import main

    model = guard.model
    folder = tmp_path / "lg3-vision"
    save(Checkpoint(model.config, {k: v.detach().clone() for k, v in model.net.state_dict().items()}, folder,
                    tokenizer=model.tokenizer, generation=model.generation_defaults,
                    chat_template=model.checkpoint.chat_template), folder, "hf")
    with resources.as_file(resources.files("llama_models.llama3").joinpath("tokenizer.model")) as p:
        shutil.copyfile(p, folder / "tokenizer.model")
    image = tmp_path / "picture.png"
    image.write_bytes(IMAGES[1])
    capsys.readouterr()
    assert main(["guard", str(folder), "Is this picture fine to share?", "--image", str(image), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "unsafe" and out["score"] == pytest.approx(guard.moderate(conversation(IMAGES[1])).score,
                                                                      abs=1e-4)
