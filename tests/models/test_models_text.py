"""Prompt encoding: matches the plain encoder, is cached, is independent of the other prompts in the call, the null
prompt, the token limit and the masks."""
import json

import pytest
import torch

from tbcm.models.pipeline import load_text_encoder
from tbcm.models.text import PromptTooLong

PROMPTS = ["a small red circle on the left", "there is a huge blue box in the middle", "", "red",
           "an image of a tiny purple plus sign near the top", "at the bottom, a big orange disc",
           "medium green triangle at the right"]


@pytest.fixture
def make_text(tiny_teacher_dir):
    """A fresh TextEncoder (empty cache) of the tiny teacher folder, optionally with other settings."""
    info = json.loads((tiny_teacher_dir / "tbcm.json").read_text())

    def make(**overrides):
        text = load_text_encoder(tiny_teacher_dir, info)
        for key, value in overrides.items():
            setattr(text, key, value)
        return text
    return make


def count_forwards(text) -> list:
    calls = []
    text.encoder.register_forward_hook(lambda module, args, output: calls.append(len(args[0]) if args else 0))
    return calls


def test_states_match_the_plain_encoder(make_text):
    text = make_text()
    states, mask = text.encode(PROMPTS)
    assert states.shape == (len(PROMPTS), 16, 32) and states.dtype == torch.float32
    assert mask.shape == (len(PROMPTS), 16) and mask.dtype == torch.int64
    for i, prompt in enumerate(PROMPTS):  # one prompt at a time through the encoder, no padding prompts
        tokens = text.tokenizer([prompt], padding="max_length", max_length=16, truncation=True,
                                return_tensors="pt")
        with torch.no_grad():
            reference = text.encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        assert torch.equal(mask[i], tokens.attention_mask[0])
        torch.testing.assert_close(states[i], reference[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads,microbatch", [(1, 1), (2, 1), (2, 4)])
def test_encoding_is_independent_of_the_other_prompts(make_text, threads, microbatch):
    """A prompt's states are the same bits alone and among others, at any place in a fixed-shape microbatch."""
    torch.set_num_threads(threads)  # restored by the autouse _threads fixture
    target = "a small red circle on the left"
    alone_states, alone_mask = make_text(microbatch=microbatch).encode([target])
    for others, position in (([], 0), (PROMPTS[1:3], 1), (PROMPTS[1:], 5), (PROMPTS[1:] * 2, 9)):
        prompts = others[:position] + [target] + others[position:]
        text = make_text(microbatch=microbatch)  # a fresh cache, so it is really encoded in this batch
        calls = count_forwards(text)
        states, mask = text.encode(prompts)
        assert calls == [microbatch] * -(-len(dict.fromkeys(prompts)) // microbatch)
        assert torch.equal(states[position], alone_states[0]), (len(prompts), position)
        assert torch.equal(mask[position], alone_mask[0])


def test_encoding_is_cached(make_text):
    text = make_text()
    calls = count_forwards(text)
    first, first_mask = text.encode(PROMPTS[:3])
    assert sum(calls) > 0
    calls.clear()
    again, again_mask = text.encode(list(reversed(PROMPTS[:3])) + [PROMPTS[0]])
    assert calls == []  # nothing re-encoded
    assert torch.equal(again[0], first[2]) and torch.equal(again[3], first[0])
    assert torch.equal(again_mask[1], first_mask[1])
    text.encode(PROMPTS[:4])
    assert len(calls) == 1  # only the new prompt (one microbatch)
    # duplicates inside one call are encoded once
    fresh = make_text()
    fresh_calls = count_forwards(fresh)
    states, _ = fresh.encode(["red"] * 9)
    assert len(fresh_calls) == 1 and torch.equal(states[0], states[8])


def test_cache_evicts_least_recently_used(make_text):
    text = make_text(cache_size=2)
    reference, _ = make_text().encode(PROMPTS[:3])
    text.encode(PROMPTS[:3])
    assert list(text._cache) == PROMPTS[1:3]
    states, _ = text.encode(PROMPTS[:3])  # evicted prompts are re-encoded to the same values
    assert torch.equal(states, reference)


def test_null_is_the_empty_prompt(make_text):
    text = make_text()
    states, mask = text.null(3)
    empty_states, empty_mask = make_text().encode([""])
    assert states.shape == (3, 16, 32) and mask.shape == (3, 16)
    for i in range(3):
        assert torch.equal(states[i], empty_states[0]) and torch.equal(mask[i], empty_mask[0])
    assert int(mask[0].sum()) == 2  # [CLS] [SEP]
    assert not torch.equal(states[0], make_text().encode(["red"])[0][0])


def test_check_rejects_prompts_over_max_length(make_text):
    text = make_text()
    fits = " ".join(["red"] * 14)  # 14 words + [CLS] + [SEP] = 16 tokens
    assert text.count_tokens(fits) == 16
    text.check(fits)
    with pytest.raises(PromptTooLong, match=r"17 encoder tokens.*at most 16"):
        text.check(fits + " red")
    with pytest.raises(ValueError):
        text.check("a very long prompt " * 20)


def test_masks_mark_real_tokens(make_text):
    text = make_text()
    _, mask = text.encode(PROMPTS)
    for prompt, row in zip(PROMPTS, mask):
        n = text.count_tokens(prompt)
        assert row.tolist() == [1] * n + [0] * (16 - n), prompt  # right padding


def test_prompts_are_lower_cased_and_stripped_as_diffusers_does(make_text):
    """diffusers' SanaPipeline._text_preprocessing(clean_caption=False): lower() and strip()."""
    mixed, mixed_mask = make_text().encode(["  A Small RED Circle on the LEFT "])
    plain, plain_mask = make_text().encode(["a small red circle on the left"])
    assert torch.equal(mixed, plain) and torch.equal(mixed_mask, plain_mask)
    assert make_text().count_tokens(" A RED circle ") == make_text().count_tokens("a red circle")


def test_complex_human_instruction_is_prefixed_then_cut_to_max_length(make_text):
    """With an instruction: tokens(CHI + prompt) padded to len(tokens(CHI)) + max_length - 2, encoded, then the
    first and the last max_length - 1 states kept (diffusers' select_index); the null prompt gets no instruction."""
    instruction = ["Describe the image in detail:", "User Prompt: "]
    text = make_text(complex_human_instruction=instruction)
    states, mask = text.encode(["A red circle", ""])
    prefix = "\n".join(instruction)
    budget = len(text.tokenizer.encode(prefix)) + text.max_length - 2
    tokens = text.tokenizer([prefix + "a red circle"], padding="max_length", max_length=budget, truncation=True,
                            return_tensors="pt")
    with torch.no_grad():
        full = text.encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    keep = [0, *range(budget - text.max_length + 1, budget)]
    assert states.shape[1] == text.max_length
    torch.testing.assert_close(states[0], full[0, keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(mask[0], tokens.attention_mask[0, keep])
    null_states, null_mask = make_text().encode([""])
    torch.testing.assert_close(states[1], null_states[0], atol=1e-6, rtol=0)
    assert torch.equal(mask[1], null_mask[0])
