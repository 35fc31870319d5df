"""The seed's path (projector + prepended visual tokens), the projectors, and the two ways images enter a prompt."""

from __future__ import annotations

import pytest
import torch

from vlmserve.model.config import ProjectorConfig, TextConfig, VisionConfig, VLMConfig
from vlmserve.model.projector import LinearProjector, PerceiverResampler, VisionProjector, build_projector
from vlmserve.model.sampling import SamplingParams, sample, uniform_noise
from vlmserve.model.vlm import VisionLanguageModel


def _config(kind: str = "mlp", **projector: int) -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8),
        text=TextConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
        projector=ProjectorConfig(kind=kind, **projector),
        image_token_index=99,
    )


def _model(kind: str = "mlp", **projector: int) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(_config(kind, **projector))


def test_vision_projector_is_the_seeds_mlp() -> None:
    proj = VisionProjector(vision_dim=32, llm_dim=48)
    assert [type(m).__name__ for m in proj.children()] == ["Linear", "Linear"]
    assert (proj.linear_1.in_features, proj.linear_1.out_features) == (32, 48)
    assert (proj.linear_2.in_features, proj.linear_2.out_features) == (48, 48)
    x = torch.randn(2, 16, 32)
    expected = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(x)))
    torch.testing.assert_close(proj(x), expected)
    assert LinearProjector(vision_dim=32, llm_dim=48)(x).shape == (2, 16, 48)


def test_prepended_visual_tokens_give_logits_for_every_position() -> None:
    model = _model()
    vision_features = torch.randn(3, 16, 32)  # (batch, num_patches, vision_dim)
    input_ids = torch.randint(0, 90, (3, 7))
    logits = model(input_ids, vision_features=vision_features)
    assert logits.shape == (3, 16 + 7, 100)  # (batch, num_visual_tokens + num_text_tokens, vocab)


def test_prepending_equals_placeholders_at_the_front() -> None:
    """Prepending visual tokens is the same computation as placeholders in the first N positions."""
    model = _model()
    features = torch.randn(2, 16, 32)
    text = torch.randint(0, 90, (2, 5))
    prepended = model(text, vision_features=features)
    placeholders = torch.cat([torch.full((2, 16), 99), text], dim=1)
    at_placeholders = model(placeholders, vision_features=features)
    torch.testing.assert_close(prepended, at_placeholders, rtol=1e-5, atol=1e-5)


def test_placeholder_count_mismatch_is_a_clear_error() -> None:
    model = _model()
    ids = torch.cat([torch.full((1, 10), 99), torch.randint(0, 90, (1, 4))], dim=1)
    with pytest.raises(ValueError, match="10 image placeholder tokens but the images give 16"):
        model(ids, vision_features=torch.randn(1, 16, 32))


def test_prepending_respects_padding_and_positions() -> None:
    """A right-padded batch gives, at real positions, the logits each sequence gives alone."""
    model = _model()
    features = torch.randn(2, 16, 32)
    a, b = torch.randint(0, 90, (1, 6)), torch.randint(0, 90, (1, 3))
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], dim=1)])
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    together = model(batch, vision_features=features, attention_mask=mask)
    alone_b = model(b, vision_features=features[1:])
    torch.testing.assert_close(together[1, : 16 + 3], alone_b[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp", "resampler"])
def test_projector_alignment_trains(kind: str) -> None:
    """The lesson's exercise: with the LM frozen, training only the projector lowers the captioning loss."""
    model = _model(kind, num_queries=8)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("multi_modal_projector")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(8, 16, 32, generator=gen)  # eight "images"
    words = torch.randint(0, 90, (8,), generator=gen)  # the word each image should make the LM say
    prompt = torch.randint(0, 90, (1, 4), generator=gen).expand(8, 4)  # the same text after every image
    losses = []
    for _ in range(60):
        logits = model(prompt, vision_features=features)  # (8, n_vis + 4, V)
        # The last visual token predicts the caption's first word (as in LLaVA's captioning stage).
        loss = torch.nn.functional.cross_entropy(logits[:, model.config.num_visual_tokens - 1], words)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    frozen = model.language_model.embed_tokens.weight
    assert frozen.grad is None


@pytest.mark.parametrize("patches", [1, 16, 49, 300])
def test_resampler_gives_a_fixed_number_of_tokens(patches: int) -> None:
    resampler = PerceiverResampler(vision_dim=32, llm_dim=48, num_queries=12, depth=2, num_heads=4)
    out = resampler(torch.randn(3, patches, 32))
    assert out.shape == (3, 12, 48)  # (batch, num_queries, llm_dim)


def test_resampler_model_uses_its_query_count() -> None:
    model = _model("resampler", num_queries=8)
    assert model.config.num_visual_tokens == 8
    logits = model(torch.randint(0, 90, (2, 5)), vision_features=torch.randn(2, 16, 32))
    assert logits.shape == (2, 8 + 5, 100)
    ids = torch.cat([torch.full((1, 8), 99), torch.randint(0, 90, (1, 3))], dim=1)
    assert model(ids, pixel_values=torch.randn(1, 3, 32, 32)).shape == (1, 11, 100)


def test_build_projector_rejects_unknown_kind() -> None:
    cfg = ProjectorConfig(kind="mlp")
    object.__setattr__(cfg, "kind", "qformer")
    with pytest.raises(ValueError, match="supported: linear, mlp, resampler"):
        build_projector(cfg, vision_dim=4, llm_dim=4)


def test_sampling_is_reproducible_and_follows_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    seeds = torch.arange(4000)
    steps = torch.zeros(4000, dtype=torch.long)
    kw = dict(temperature=torch.ones(4000), top_k=torch.zeros(4000, dtype=torch.long), top_p=torch.ones(4000))
    a = sample(logits, seeds=seeds, steps=steps, filter_needed=False, **kw)
    b = sample(logits, seeds=seeds, steps=steps, filter_needed=True, **kw)
    assert torch.equal(a, b)  # the sort path draws the same tokens as the plain path
    freq = torch.bincount(a, minlength=4).float() / 4000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)
    # One row's draw does not depend on the rows around it.
    alone = sample(logits[:1], seeds=seeds[7:8], steps=steps[:1], filter_needed=False,
                   temperature=torch.ones(1), top_k=torch.zeros(1, dtype=torch.long), top_p=torch.ones(1))
    assert alone.item() == a[7].item()


def test_top_k_top_p_and_greedy() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, -5.0]]).repeat(500, 1)
    n = 500
    base = dict(seeds=torch.arange(n), steps=torch.zeros(n, dtype=torch.long))
    top1 = sample(logits, temperature=torch.ones(n), top_k=torch.ones(n, dtype=torch.long), top_p=torch.ones(n), **base)
    assert set(top1.tolist()) == {0}
    nucleus = sample(logits, temperature=torch.ones(n), top_k=torch.zeros(n, dtype=torch.long),
                     top_p=torch.full((n,), 0.9), **base)
    assert set(nucleus.tolist()) == {0, 1}
    greedy = sample(logits, temperature=torch.zeros(n), top_k=torch.zeros(n, dtype=torch.long), top_p=torch.ones(n),
                    **base)
    assert set(greedy.tolist()) == {0}
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_noise_is_uniform_and_keyed() -> None:
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 10000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert torch.equal(u[0], uniform_noise(torch.tensor([1]), torch.tensor([0]), 10000)[0])
