"""N-gram speculative decoding never proposes an image placeholder: ids past the target's logits (Hugging Face's
mllama `<|image|>` is 128256, the text vocabulary being 0..128255) or placeholder tokens inside the vocabulary."""

import asyncio

import torch

from llamaherd.engine.sampling import SamplingParams
from llamaherd.engine.speculative import NgramProposer
from llamaherd.server import ServedModel
from llamaherd.vision_inputs import placeholder_ids

from .test_vision_serving import IMAGES, tiny_mllama

HF_IMAGE = 128256  # transformers' MllamaForConditionalGeneration image_token_index


def test_a_proposal_stops_before_an_id_the_target_cannot_emit():
    plain = NgramProposer()
    guarded = NgramProposer(vocab_size=128256, exclude=frozenset({128011}))
    context = [1, 5, HF_IMAGE, 7, 5]  # the last 5 follows the first: the image token comes next
    assert plain.propose(context, 5, 3, None).tokens == [HF_IMAGE, 7, 5]  # what went wrong before
    assert guarded.propose(context, 5, 3, None).tokens == []
    assert guarded.propose([1, 5, 6, 128011, 9, 5], 6, 3, None).tokens == [6]
    assert guarded.propose([1, 5, 6, 7, 5], 5, 3, None).tokens == [6, 7, 5]  # text is proposed as before


def test_placeholder_ids_of_the_llama_tokenizers():
    from llamaherd.tokenizer import Tokenizer

    l3, l4 = Tokenizer.llama3(), Tokenizer.llama4()
    assert l3.special_id("<|image|>") in placeholder_ids(l3)
    assert {l4.special_id(t) for t in ("<|patch|>", "<|image_start|>", "<|image_end|>")} <= placeholder_ids(l4)
    assert placeholder_ids(None) == frozenset()


def test_served_ngram_speculation_over_an_image_prompt_equals_plain_decoding():
    # A prompt in Hugging Face's ids: the image token is 128256, outside the logits, and follows token 5. The
    # logit bias makes 5 the first generated token, so the proposer's lookup of [5] lands before the image
    # token: without the guard it offers 128256 and verification indexes past the logits (the request fails).
    # With p(5) ~ 1, plain and speculative decoding give the same tokens.
    model = tiny_mllama()
    served = ServedModel(model, "tiny-mllama", kv_cache_bytes=16 << 20, speculative="ngram")
    # (the last 6 ids, which the text stream decodes for context, are text: this tokenizer has no 128256)
    prompt = [model.tokenizer.bos_id, 5, HF_IMAGE, 7, 11, 12, 13, 14, 15, 9]
    # (sampling, not greedy: verification reads p[proposed token], which 128256 is past the end of)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=0, ignore_eos=True, logit_bias={5: 100})

    async def run() -> tuple[list, list]:
        served.start()
        try:
            out = []
            for speculate in (True, False):
                images = await served.prepare_images(prompt, [IMAGES["wide"]])
                _, pieces, finish = await served.complete(prompt, params, images=images, speculate=speculate)
                assert finish == "length", finish
                out.append([p.token for p in pieces if p.token is not None])
            return out
        finally:
            served.shutdown()

    spec, plain = asyncio.run(run())
    assert spec == plain == [5] * 12
    assert served.engine.stats["spec_proposed"] > 0  # speculation ran (text n-grams of the output)
    assert torch.tensor(spec).max() < 128256
