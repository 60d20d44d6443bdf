"""Images through the public API: Meta's chat prompt with image items, `Model.logits(ids, images=...)` and
`Model.chat` with image_url parts on a tiny Hugging Face Llama 3.2 Vision folder, and bad input.

The folder is written by transformers' own save_pretrained (tiny random MllamaForConditionalGeneration, the
Llama 3 vocabulary so that the official tokenizer fits); logits are compared with transformers' model fed by
transformers' own image processor.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import llamaherd
from llamaherd.chat import get_format
from llamaherd.errors import ImageError
from llamaherd.image import MEAN, STD
from llamaherd.tokenizer import Tokenizer

from .vision_fixtures import hf_config_dict, hf_inputs, redraw, with_meta_intermediate_layers

pytest.importorskip("transformers")
VOCAB = 128256  # the Llama 3 vocabulary; <|image|> is 128256 in the model's input (Meta and HF agree)
IMAGE_TOKEN = 128011  # <|image|> in Meta's tokenizer.model (llama3/tokenizer.py special tokens)


def _png(w: int, h: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# -- the prompt: Meta's ChatFormat.encode_dialog_prompt with image items ------------------------------------


@pytest.mark.parametrize("layout", ["image first", "text then image", "two images", "system and turns"])
def test_prompt_with_images_equals_meta_encoder(layout):
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    a, b = _png(20, 30, 1), _png(40, 10, 2)
    img_a = {"type": "image_url", "image_url": {"url": _data_url(a)}}
    img_b = {"type": "image_url", "image_url": {"url": _data_url(b)}}
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    ours, meta = {
        "image first": ([{"role": "user", "content": [img_a, text("Describe this image.")]}],
                        [RawMessage(role="user", content=[RawMediaItem(data=a), RawTextItem(text="Describe this image.")])]),
        "text then image": ([{"role": "user", "content": [text("What is in"), img_a, text(" it?")]}],
                            [RawMessage(role="user", content=[RawTextItem(text="What is in"), RawMediaItem(data=a),
                                                              RawTextItem(text=" it?")])]),
        "two images": ([{"role": "user", "content": [img_a, img_b, text("Compare.")]}],
                       [RawMessage(role="user", content=[RawMediaItem(data=a), RawMediaItem(data=b),
                                                         RawTextItem(text="Compare.")])]),
        "system and turns": (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [img_a, text("Color?")]},
             {"role": "assistant", "content": "Grey."}, {"role": "user", "content": [text("And this?"), img_b]}],
            [RawMessage(role="system", content="Be brief."),
             RawMessage(role="user", content=[RawMediaItem(data=a), RawTextItem(text="Color?")]),
             RawMessage(role="assistant", content="Grey.", stop_reason="end_of_turn"),
             RawMessage(role="user", content=[RawTextItem(text="And this?"), RawMediaItem(data=b)])]),
    }[layout]
    expected = ChatFormat(MetaTokenizer.get_instance()).encode_dialog_prompt(meta)
    got = get_format("llama3", Tokenizer.llama3(), images=True).encode_dialog(ours)
    # Meta's model input writes <|image|> as 128256 (the first learnable embedding); ours keeps the tokenizer's
    # id until the model is called (vision_inputs.WithImages maps it).
    assert [VOCAB if t == IMAGE_TOKEN else t for t in got] == expected.tokens
    assert len(expected.vision.images) == got.count(IMAGE_TOKEN)


# -- a tiny HF folder through llamaherd.load ----------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    d = hf_config_dict()
    d["text_config"].update(vocab_size=VOCAB, pad_token_id=128004, bos_token_id=128000, eos_token_id=128009)
    cfg = MllamaConfig(vision_config=d["vision_config"], text_config=d["text_config"], image_token_index=VOCAB)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = with_meta_intermediate_layers(redraw(MllamaForConditionalGeneration(cfg), seed=3))
    path = tmp_path_factory.mktemp("mllama-hf")
    ref.save_pretrained(path)
    import llama_models

    shutil.copyfile(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", path / "tokenizer.model")
    return path, ref


def _hf_pixels(images: list[bytes]):
    """transformers' own processor (released settings: CLIP mean/std, bilinear; 28-pixel tiles here)."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    proc = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4, image_mean=list(MEAN),
                                   image_std=list(STD), resample=Image.Resampling.BILINEAR)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    return proc(images=[pil], return_tensors="pt")


def test_model_logits_with_images_match_transformers(folder):
    path, ref = folder
    model = llamaherd.load(path)
    assert model.config.arch == "mllama"
    a, b = _png(50, 30, 4), _png(20, 70, 5)
    tok = model.tokenizer
    ids = [IMAGE_TOKEN] + tok.encode("Look at", bos=False) + [IMAGE_TOKEN] + tok.encode(" these two.", bos=False)
    got = model.logits(ids, images=[_data_url(a), b])  # a data: URL and raw bytes
    px = _hf_pixels([a, b])
    hf_ids = [VOCAB if t == IMAGE_TOKEN else t for t in ids]
    grids = [tuple(int(x) for x in r) for r in _grids(px)]
    inputs = hf_inputs(hf_ids, grids, px["pixel_values"].float())
    inputs["input_ids"] = torch.tensor([hf_ids])
    with torch.no_grad():
        expected = ref(**{**inputs, "cross_attention_mask": _xmask(hf_ids, grids)}).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _grids(px) -> list[tuple[int, int]]:
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    ratios = get_all_supported_aspect_ratios(4)
    return [ratios[int(i) - 1] for i in px["aspect_ratio_ids"][0]]


def _xmask(ids, grids):
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    spans = get_cross_attention_token_mask(ids, VOCAB)
    return torch.as_tensor(convert_sparse_cross_attention_mask_to_dense(
        [spans], [[r * c for r, c in grids]], max_num_tiles=4, length=len(ids)))


def test_chat_with_an_image_url_part(folder):
    path, _ = folder
    model = llamaherd.load(path)
    image = _data_url(_png(30, 30, 6))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "Describe the picture."}]}]
    reply = model.chat(messages, max_tokens=5, temperature=0)
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    # The same request as a prompt of ids plus the image gives the same greedy tokens.
    ids = model.chat_format(images=True).encode_dialog(messages)
    done = model.complete(ids, images=[image], max_tokens=5, temperature=0,
                          extra_stop_ids=model.chat_format().stop_ids)
    assert reply["content"] == done.text.strip() or reply["content"] == done.text
    streamed = "".join(model.chat(messages, stream=True, max_tokens=5, temperature=0))
    assert streamed == done.text


@pytest.mark.parametrize("images,message", [
    (["https://example.com/cat.png"], "remote image URLs are refused"),
    ([b"garbage"], "not a readable image"),
    ([_png(8, 8, 1)] * 2, "2 images were given"),
    ([_png(8, 8, 1)] * 9, "at most 8"),
])
def test_bad_images_raise_image_error(folder, images, message):
    model = llamaherd.load(folder[0])
    ids = [128000, IMAGE_TOKEN, 40, 41]
    with pytest.raises(ImageError, match=message):
        model.logits(ids, images=images)


def test_images_for_a_text_only_model_raise_image_error(tmp_path):
    from llamaherd.config import ModelConfig
    from llamaherd.model import build
    from llamaherd.vision_inputs import bind_images

    net = build(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16))
    with pytest.raises(ImageError, match="text-only"):
        bind_images(net, None, [1, 2], [_png(8, 8, 1)])


def test_herd_run_with_image(folder, tmp_path, capsys):
    from llamaherd.cli import main

    path, _ = folder
    cat = tmp_path / "cat.png"
    cat.write_bytes(_png(33, 21, 8))
    model = llamaherd.load(path)
    flags = ["--image", str(cat), "--max-tokens", "3", "--temperature", "0"]
    # A Llama 3 tokenizer: a chat turn whose user content is the image, then the text.
    assert main(["run", str(path), "describe this", *flags]) == 0
    messages = [{"role": "user", "content": [{"type": "image", "image": str(cat)},
                                             {"type": "text", "text": "describe this"}]}]
    assert capsys.readouterr().out == "".join(model.chat(messages, stream=True, max_tokens=3, temperature=0)) + "\n"
    # --raw: BOS, <|image|>, the text, completed as is.
    assert main(["run", str(path), "describe this", "--raw", *flags]) == 0
    ids = model.encode_prompt("describe this")
    expected = "".join(model.generate([ids[0], IMAGE_TOKEN] + ids[1:], stream=True, images=[str(cat)],
                                      skip_special_tokens=True, max_tokens=3, temperature=0))
    assert capsys.readouterr().out == expected + "\n"


def test_herd_run_refuses_a_missing_image(folder, capsys):
    from llamaherd.cli import main

    assert main(["run", str(folder[0]), "describe", "--image", "/no/such/cat.png", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "no such image file" in err and "Traceback" not in err


def test_hf_folder_round_trip_through_our_writer(folder, tmp_path):
    """HF folder -> llamaherd (our names) -> our HF writer -> transformers' from_pretrained: same logits as the
    original model; and Meta's format refuses the architecture with a clear error instead of writing it wrong."""
    from transformers import MllamaForConditionalGeneration

    from llamaherd.checkpoint import read
    from llamaherd.checkpoint.save import save
    from llamaherd.errors import CheckpointError

    path, ref = folder
    out = save(read(path), tmp_path / "written", "hf")
    again = with_meta_intermediate_layers(MllamaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval())
    ids = torch.tensor([[VOCAB, 40, 41, 42]])
    px = _hf_pixels([_png(44, 22, 9)])
    grids = _grids(px)
    inputs = {**hf_inputs(ids[0].tolist(), grids, px["pixel_values"].float()),
              "cross_attention_mask": _xmask(ids[0].tolist(), grids)}
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, ref(**inputs).logits, atol=0, rtol=0)
    with pytest.raises(CheckpointError):
        save(read(path), tmp_path / "meta", "meta")


def test_image_parts_are_refused_where_images_are_not_bound(folder):
    """A chat format renders image parts only when asked to (Model.chat binds the images); the plain format,
    which the servers use, refuses them, so no prompt runs with an <|image|> token and no image."""
    from llamaherd.errors import ChatFormatError

    model = llamaherd.load(folder[0])
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png(9, 9, 1))}}]}]
    with pytest.raises(ChatFormatError, match="image part"):
        model.chat_format().encode_dialog(messages)
    with pytest.raises(ChatFormatError, match="image part"):
        get_format("llama3", Tokenizer.llama3()).encode_dialog(messages)
    assert model.chat_format(images=True).encode_dialog(messages).count(IMAGE_TOKEN) == 1


def test_chat_repl_attaches_image_paths(folder, tmp_path):
    """In `herd chat` with a vision model, image file paths typed in a line become image parts (as Ollama's REPL
    does), quoted paths with spaces included; the reply is the one Model.chat gives for those parts."""
    from llamaherd.cli._repl import ChatSession
    from llamaherd.vision_inputs import user_content

    cat = tmp_path / "my cat.png"
    cat.write_bytes(_png(12, 16, 3))
    line = f"what is in '{cat}' and here?"
    assert user_content(line) == [{"type": "image", "image": str(cat)},
                                  {"type": "text", "text": "what is in and here?"}]
    assert user_content("no image /no/such.png here") == "no image /no/such.png here"
    model = llamaherd.load(folder[0])
    out = io.StringIO()
    session = ChatSession(model, {"max_tokens": 3, "temperature": 0}, stdin=io.StringIO(), stdout=out)
    reply = session.reply(line)
    expected = "".join(model.chat([{"role": "user", "content": user_content(line)}], stream=True, max_tokens=3,
                                  temperature=0))
    assert reply == expected and session.messages[0]["content"][0]["type"] == "image"
