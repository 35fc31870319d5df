"""Our model core against transformers' LlavaForConditionalGeneration: same weights, same inputs, same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlmserve.model.generation import generate
from vlmserve.model.weights import load_model

PROMPTS = ["what color is the circle?", "describe the image and the shapes", "how many?"]


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    sizes = [(40, 50), (64, 32), (17, 90), (200, 120)]
    return [Image.fromarray(rng.randint(0, 255, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def _hf(ckpt: Path) -> tuple[LlavaForConditionalGeneration, object]:
    return LlavaForConditionalGeneration.from_pretrained(ckpt).eval(), AutoProcessor.from_pretrained(ckpt)


def _prompt(processor: object, text: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


@torch.no_grad()
def test_batched_logits_match_transformers(tiny_checkpoint: Path) -> None:
    hf, processor = _hf(tiny_checkpoint)
    ours = load_model(tiny_checkpoint)
    processor.tokenizer.padding_side = "left"
    texts = [_prompt(processor, p) for p in PROMPTS]
    inputs = processor(images=_images(3, 0), text=texts, return_tensors="pt", padding=True)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1, "prompts should differ in length"
    expected = hf(**inputs).logits  # (3, T, V)
    got = ours(inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    real = inputs["attention_mask"].bool()
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=2e-4)  # float32 rounding, any CPU
    # The numbers depend on the image: a different image moves the logits well beyond the tolerance.
    other = processor(images=_images(3, 1), text=texts, return_tensors="pt", padding=True)
    moved = ours(other["input_ids"], pixel_values=other["pixel_values"], attention_mask=other["attention_mask"])
    assert (moved[real] - got[real]).abs().max().item() > 1e-2


@torch.no_grad()
def test_greedy_tokens_match_transformers_generate(tiny_checkpoint: Path) -> None:
    hf, processor = _hf(tiny_checkpoint)
    ours = load_model(tiny_checkpoint)
    eos = processor.tokenizer.eos_token_id
    for i, (text, image) in enumerate(zip(PROMPTS, _images(3, 2), strict=True)):
        inputs = processor(images=[image], text=[_prompt(processor, text)], return_tensors="pt")
        prompt_len = inputs["input_ids"].shape[1]
        # EOS suppressed on both sides so that all 32 steps are compared.
        out = hf.generate(
            **inputs, max_new_tokens=32, do_sample=False, suppress_tokens=[eos], output_scores=True,
            return_dict_in_generate=True,
        )
        expected = out.sequences[0, prompt_len:].tolist()
        got = list(
            generate(ours, inputs["input_ids"][0].tolist(), pixel_values=inputs["pixel_values"], max_new_tokens=32,
                     suppress_token_ids=[eos])
        )
        assert len(expected) == 32, i
        assert got == expected, f"prompt {i}"
        # Greedy steps are decisive (no near-ties), so the equality above means something.
        top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values  # (32, 2)
        assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-3


@torch.no_grad()
def test_greedy_stops_at_eos_like_transformers(clip_llama: Path) -> None:
    hf, processor = _hf(clip_llama)
    ours = load_model(clip_llama)
    eos = processor.tokenizer.eos_token_id
    stopped = 0
    for seed in range(6):
        inputs = processor(images=_images(1, seed), text=[_prompt(processor, PROMPTS[seed % 3])], return_tensors="pt")
        expected = hf.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        got = list(generate(ours, inputs["input_ids"][0].tolist(), pixel_values=inputs["pixel_values"],
                            max_new_tokens=32, eos_token_ids=[eos]))
        assert got == expected.tolist()
        stopped += got[-1] == eos
    assert stopped > 0, "no prompt reached EOS: the test would not exercise stopping"


@torch.no_grad()
def test_kv_cached_decoding_equals_recomputation(tiny_checkpoint: Path) -> None:
    _, processor = _hf(tiny_checkpoint)
    ours = load_model(tiny_checkpoint)
    inputs = processor(images=_images(1, 3), text=[_prompt(processor, PROMPTS[0])], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    tokens = list(generate(ours, ids, pixel_values=inputs["pixel_values"], max_new_tokens=24))
    full = torch.tensor([ids + tokens])
    logits = ours(full, pixel_values=inputs["pixel_values"])[0]  # (T, V) without any cache
    recomputed = logits[len(ids) - 1 : -1].argmax(-1).tolist()
    for k, (again, cached) in enumerate(zip(recomputed, tokens, strict=True)):
        if again != cached:  # only where the top two tie within float32 rounding (the shapes differ, so may the sums)
            row = logits[len(ids) - 1 + k]
            assert (row[again] - row[cached]).abs() <= 1e-4 * row.abs().max(), (k, again, cached)


def test_transformers_rope_parity() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from vlmserve.model.config import TextConfig
    from vlmserve.model.text import rope_inv_freq

    cases = [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ]
    for params in cases:
        hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                             rope_parameters=params)
        fn = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
        expected = fn(hf_cfg, "cpu")[0] if fn else 1.0 / (params["rope_theta"] ** (torch.arange(0, 128, 2) / 128))
        ours = TextConfig.from_hf(hf_cfg.to_dict())
        assert torch.allclose(rope_inv_freq(ours.rope, ours.head_dim), expected.float(), rtol=1e-6), params
