"""Serving layouts (model/serving_weights.py): fused projections and CPU weight layouts keep the model's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import AutoProcessor

from vlmserve.model.serving_weights import PackedLinear, packing_works, prepare_for_serving, resolve_layout
from vlmserve.model.weights import checkpoint_state, load_model, map_checkpoint_key, save_model

CPU = torch.device("cpu")


def _inputs(ckpt: Path) -> dict[str, torch.Tensor]:
    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(2)]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}], add_generation_prompt=True,
    ) for t in ("what color is the circle?", "how many shapes?")]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     attention_mask=inputs["attention_mask"])  # (B, T, V)


@pytest.mark.parametrize("layout", ["standard", "input-major", "packed"])
def test_serving_layouts_keep_the_logits(tiny_checkpoint: Path, layout: str) -> None:
    inputs = _inputs(tiny_checkpoint)
    expected = _logits(load_model(tiny_checkpoint), inputs)
    model = load_model(tiny_checkpoint)
    applied = prepare_for_serving(model, layout=layout, max_batch=4)  # type: ignore[arg-type]
    assert applied == ("input-major" if layout == "packed" and not packing_works(torch.float32) else layout)
    got = _logits(model, inputs)
    real = inputs["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4 * expected[real].abs().max()

    lm = model.language_model
    if model.config.text.tie_word_embeddings:
        assert lm.lm_head.weight is lm.embed_tokens.weight  # a tied head stays tied, untouched
    down = lm.layers[0].mlp.down_proj
    if applied == "packed":
        assert isinstance(down, PackedLinear) and isinstance(lm.layers[-1].self_attn.qkv_proj, PackedLinear)
        assert not any(isinstance(m, nn.Linear) for m in model.vision_tower.modules())
    elif applied == "input-major":
        assert down.weight.shape == (down.out_features, down.in_features)
        assert down.weight.stride() == (1, down.out_features)
    else:
        assert down.weight.is_contiguous()

    assert prepare_for_serving(model, layout=layout, max_batch=4) == applied  # idempotent
    assert torch.equal(_logits(model, inputs), got)


def test_fused_projections_are_the_checkpoint_parts_in_order(checkpoint_factory, tmp_path: Path) -> None:
    """q/k/v (with Qwen2's biases) and gate/up load as one matrix each, the checkpoint's parts in order, and save back
    as the same parts, key for key."""
    ckpt = checkpoint_factory("siglip-qwen2")
    raw = load_file(next(ckpt.glob("*.safetensors")))
    model = load_model(ckpt)
    prefix = next(k for k in raw if k.endswith("layers.0.self_attn.q_proj.bias")).removesuffix("q_proj.bias")
    attn = model.language_model.layers[0].self_attn
    for kind in ("weight", "bias"):
        parts = [raw[f"{prefix}{p}_proj.{kind}"] for p in ("q", "k", "v")]
        assert torch.equal(getattr(attn.qkv_proj, kind), torch.cat(parts))
    mlp_prefix = prefix.replace("self_attn.", "mlp.")
    gate_up = torch.cat([raw[f"{mlp_prefix}gate_proj.weight"], raw[f"{mlp_prefix}up_proj.weight"]])
    assert torch.equal(model.language_model.layers[0].mlp.gate_up_proj.weight, gate_up)
    saved = load_file(save_model(model, tmp_path / "out") / "model.safetensors")
    ours = {map_checkpoint_key(k): v for k, v in raw.items() if map_checkpoint_key(k) is not None}
    assert sorted(saved) == sorted(checkpoint_state(model))
    assert {map_checkpoint_key(k) for k in saved} == set(ours)  # the same parts under the same names
    for key, tensor in saved.items():
        assert torch.equal(tensor, ours[map_checkpoint_key(key)]), key


def test_auto_layout_choice() -> None:
    packed = "packed" if packing_works(torch.float32) else "input-major"
    assert resolve_layout("auto", CPU, torch.float32, 16) == packed
    assert resolve_layout("auto", CPU, torch.float32, 2) == "input-major"
    assert resolve_layout("auto", CPU, torch.float32, 1) == "input-major"
    bf16_packed = "packed" if packing_works(torch.bfloat16) else "input-major"
    assert resolve_layout("auto", CPU, torch.bfloat16, 1) == bf16_packed  # in bf16 packed wins at every size
    assert resolve_layout("packed", torch.device("cuda"), torch.bfloat16, 16) == "standard"
    assert resolve_layout("input-major", torch.device("cuda"), torch.float16, 1) == "standard"
    assert resolve_layout("packed", CPU, torch.float16, 16) == "input-major"  # oneDNN packs float32 and bfloat16
    with pytest.raises(ValueError, match="unknown weight layout"):
        resolve_layout("blocked", CPU, torch.float32, 16)  # type: ignore[arg-type]


@pytest.mark.skipif(not packing_works(torch.float32), reason="this PyTorch build has no oneDNN packing")
def test_packed_linear_matches_linear_on_any_batch_shape() -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 80).requires_grad_(False)
    packed = PackedLinear(linear)
    for shape in [(1, 96), (1, 1, 96), (16, 1, 96), (3, 45, 96)]:
        x = torch.randn(*shape, generator=gen)
        want = linear(x)
        assert (packed(x) - want).abs().max() <= 1e-5 * want.abs().max()
    assert "in_features=96, out_features=80" in repr(packed)


def test_bfloat16_decode_step_stays_close_to_float32(checkpoint_factory) -> None:
    """A packed bf16 model decodes through the paged cache (its one-token attention in fp32 on a CPU) as close to
    fp32 as bf16's own rounding allows: no further from fp32 than a plain cache-less bf16 forward is."""
    from vlmserve.model.generation import single_sequence_batch
    from vlmserve.model.kv_cache import PagedKVCache

    ckpt = checkpoint_factory("clip-llama")
    fp32, bf16 = load_model(ckpt), load_model(ckpt, dtype=torch.bfloat16)
    prepare_for_serving(bf16, layout="auto", max_batch=4)
    cfg = fp32.language_model.config
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        prompt = torch.randint(0, cfg.vocab_size, (1, 12), generator=gen)  # (1, T)
        steps, dense = [], []
        for model, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
            lm = model.language_model
            cache = PagedKVCache(num_layers=cfg.num_hidden_layers, num_blocks=4, block_size=8,
                                 num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=dtype)
            with torch.no_grad():
                batch, positions = single_sequence_batch(cache, 0, 12, cpu, {None})
                lm(prompt, positions=positions, paged=batch)
                batch, positions = single_sequence_batch(cache, 12, 1, cpu, {None})
                steps.append(lm(prompt[:, -1:], positions=positions, paged=batch)[:, 0].float())  # (1, V)
                dense.append(lm(torch.cat([prompt, prompt[:, -1:]], 1))[:, -1].float())  # (1, V)
        assert steps[1].dtype == torch.float32 and torch.isfinite(steps[1]).all()
        assert (steps[0] - dense[0]).abs().max() <= 1e-4 * dense[0].abs().max()  # fp32: paged == cache-less
        paged_error, dense_error = (steps[1] - steps[0]).abs().max(), (dense[1] - dense[0]).abs().max()
        assert paged_error <= 1.5 * dense_error + 0.01 * steps[0].abs().max()  # bf16 rounding, nothing worse
