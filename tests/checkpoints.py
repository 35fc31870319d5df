"""Tiny random LLaVA-format checkpoints, built with transformers' own classes and a tokenizer trained on the spot.

Nothing is downloaded. Each builder writes a complete checkpoint directory (config.json, model.safetensors,
tokenizer files, chat template, processor/preprocessor configs) that both transformers and vlmserve load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]

# llava-1.5's prompt shape, written as a template over OpenAI-style content parts:
# "USER: <image>\n{text} ASSISTANT:" (images first in the user turn, one placeholder each).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}\n"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_WORDS = [
    "what", "color", "is", "the", "circle", "square", "triangle", "red", "green", "blue", "yellow", "purple",
    "orange", "shape", "object", "how", "many", "shapes", "are", "there", "one", "two", "three", "is", "a", "yes",
    "no", "describe", "image", "and", "left", "right", "top", "bottom", "big", "small", "the", "of", "picture",
    "this", "café", "naïve", "東京", "привет", "émoji", "🙂", "über", "straße",
]


def train_tokenizer(vocab_size: int = 320, seed: int = 0, image_token: str = IMAGE_TOKEN,
                    extra_special: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a small synthetic corpus and wrap it for transformers."""
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + "?" for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": image_token, **(extra_special or {})},
    )
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class TinySpec:
    """What distinguishes one tiny checkpoint from another."""

    name: str
    vision: str = "clip"  # "clip" | "siglip"
    text: str = "llama"  # "llama" | "qwen2"
    feature_layer: int | list[int] = -2
    strategy: str = "default"
    image_size: int = 32
    patch_size: int = 8
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = False
    init_scale: float = 0.25
    seed: int = 0
    processor_extra: dict = field(default_factory=dict)
    max_positions: int = 256
    family: str = "llava"  # "llava" | "llava_next" (anyres tiles over `pinpoints`, tiles of image_size)
    pinpoints: tuple[tuple[int, int], ...] = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))


SPECS = {
    "clip-llama": TinySpec(
        name="clip-llama",
        rope={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "siglip-qwen2": TinySpec(
        name="siglip-qwen2",
        vision="siglip",
        text="qwen2",
        feature_layer=-1,
        strategy="full",
        rope={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
        tie_word_embeddings=True,
        seed=1,
    ),
    "clip-llama-multilayer": TinySpec(
        name="clip-llama-multilayer", feature_layer=[-3, -1], image_size=48, patch_size=12, seed=2
    ),
}
# The other families (tests/test_families.py), kept apart from SPECS, whose llava-1.5 checkpoints every
# `tiny_checkpoint` test runs on.
FAMILY_SPECS = {
    # llava-v1.6's layout at a 32 px tile (its pinpoints over 336 px tiles, scaled by 32/336)
    "llava-next": TinySpec(name="llava-next", family="llava_next", seed=3, max_positions=1024),
    # LLaVA-OneVision's layout (SigLIP, strategy full, Qwen2, anyres_max_9) at a 32 px tile; grids up to 6 x 6 tiles,
    # so that a large image's features are shrunk as anyres_max_9 does
    "llava-onevision": TinySpec(name="llava-onevision", family="llava_onevision", vision="siglip", text="qwen2",
                                feature_layer=-1, strategy="full", seed=5, max_positions=1024,
                                pinpoints=((32, 32), (32, 64), (64, 32), (64, 64), (32, 96), (96, 32), (96, 96),
                                           (96, 192), (192, 96), (192, 192))),
    # Qwen2-VL's layout: patch 4, 2 x 2 merge (8 px a side per visual token), 4..256 visual tokens per image
    "qwen2-vl": TinySpec(name="qwen2-vl", family="qwen2_vl", seed=4, patch_size=4, max_positions=1024),
    # Qwen2.5-VL's: the same with RMSNorm, a gated MLP, and attention within 16 px windows but in block 1
    "qwen2.5-vl": TinySpec(name="qwen2.5-vl", family="qwen2_5_vl", seed=6, patch_size=4, max_positions=1024),
    # Idefics3 / SmolVLM's layout: 24 px tiles of 6 x 6 patches (the tile is the tower's image_size, as released), pixel
    # shuffle 2 (9 tokens a tile), images resized to a 96 px longest edge: up to 4 x 4 tiles and the global view
    "idefics3": TinySpec(name="idefics3", family="idefics3", vision="siglip", seed=7, image_size=24, patch_size=4,
                         max_positions=1024),
    # Gemma 3's layout: a 32 px SigLIP view of 8 x 8 patches pooled 2 x 2 into 16 tokens; a Gemma 3 LM of one sliding
    # layer (a 12-token window, shorter than an image's span: the window cuts into the bidirectional span) and one
    # global
    "gemma3": TinySpec(name="gemma3", family="gemma3", vision="siglip", seed=8, image_size=32, patch_size=4,
                       max_positions=1024),
}
QWEN2_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's prompt shape (ChatML), each image as <|vision_start|><|image_pad|><|vision_end|>
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_checkpoint(spec: TinySpec, out_dir: Path) -> Path:
    """Write a tiny random LLaVA checkpoint for `spec` into `out_dir` and return it."""
    torch.manual_seed(spec.seed)
    if spec.family in ("qwen2_vl", "qwen2_5_vl"):
        return _build_qwen2_vl(spec, out_dir, train_tokenizer(seed=spec.seed, image_token="<|image_pad|>"))
    if spec.family in ("idefics3", "gemma3"):
        from family_checkpoints import build_family_checkpoint  # Idefics3's and Gemma 3's builders

        return build_family_checkpoint(spec, out_dir)
    tokenizer = train_tokenizer(seed=spec.seed)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if spec.vision == "clip":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            projection_dim=32,
            initializer_range=spec.init_scale,
            initializer_factor=spec.init_scale * 20,
        )
    else:
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            vision_use_head=False,
        )
    text_kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=spec.max_positions,
        rope_parameters=spec.rope,
        initializer_range=spec.init_scale,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = LlamaConfig(**text_kwargs) if spec.text == "llama" else Qwen2Config(**text_kwargs)
    num_patches = (spec.image_size // spec.patch_size) ** 2
    image_seq_length = num_patches + (1 if spec.vision == "clip" and spec.strategy == "full" else 0)
    if spec.family == "llava_next":
        return _build_llava_next(spec, out_dir, tokenizer, vision, text)
    if spec.family == "llava_onevision":
        return _build_llava_onevision(spec, out_dir, tokenizer, vision, text)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=image_seq_length,
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy=spec.strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config).eval()
    _scale_random_weights(model, spec.init_scale, spec.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)

    size = {"shortest_edge": spec.image_size}
    crop = {"height": spec.image_size, "width": spec.image_size}
    if spec.vision == "clip":
        image_processor = CLIPImageProcessor(size=size, crop_size=crop, **spec.processor_extra)
    else:
        image_processor = SiglipImageProcessor(
            size={"height": spec.image_size, "width": spec.image_size}, **spec.processor_extra
        )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.strategy,
        num_additional_image_tokens=1 if spec.vision == "clip" else 0,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _build_llava_next(spec: TinySpec, out_dir: Path, tokenizer: PreTrainedTokenizerFast, vision: CLIPVisionConfig,
                      text: LlamaConfig | Qwen2Config) -> Path:
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy=spec.strategy,
        image_grid_pinpoints=[list(p) for p in spec.pinpoints],
        projector_hidden_act="gelu",
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    _scale_random_weights(model, spec.init_scale, spec.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=[list(p) for p in spec.pinpoints], **spec.processor_extra)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                                   vision_feature_select_strategy=spec.strategy, num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _build_llava_onevision(spec: TinySpec, out_dir: Path, tokenizer: PreTrainedTokenizerFast,
                           vision: SiglipVisionConfig | CLIPVisionConfig, text: LlamaConfig | Qwen2Config) -> Path:
    """transformers' LlavaOnevisionForConditionalGeneration and its PIL image processor (LlavaOnevisionProcessor needs
    a video processor, hence torchvision: the tests expand <image> as it does)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=spec.feature_layer, vision_feature_select_strategy=spec.strategy,
        image_grid_pinpoints=[list(p) for p in spec.pinpoints], vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu", tie_word_embeddings=spec.tie_word_embeddings,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _scale_random_weights(model, spec.init_scale, spec.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    LlavaOnevisionImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size},
                                    image_grid_pinpoints=[list(p) for p in spec.pinpoints]).save_pretrained(out_dir)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _build_qwen2_vl(spec: TinySpec, out_dir: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """transformers' Qwen2VLForConditionalGeneration and its PIL image processor (Qwen2VLProcessor itself needs a
    video processor, hence torchvision: the tests expand <|image_pad|> as it does)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_VL_TOKENS})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_TOKENS}
    v25 = spec.family == "qwen2_5_vl"
    vision = (Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                                     hidden_act="silu", num_heads=4, patch_size=spec.patch_size, spatial_merge_size=2,
                                     temporal_patch_size=2, window_size=4 * spec.patch_size, fullatt_block_indexes=[1])
              if v25 else
              Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, hidden_act="quick_gelu", mlp_ratio=2,
                                  num_heads=4, patch_size=spec.patch_size, spatial_merge_size=2, temporal_patch_size=2))
    text = Qwen2VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = (Qwen2_5_VLConfig if v25 else Qwen2VLConfig)(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    model = (Qwen2_5_VLForConditionalGeneration if v25 else Qwen2VLForConditionalGeneration)(config).eval()
    _scale_random_weights(model, spec.init_scale, spec.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    factor = spec.patch_size * 2
    Qwen2VLImageProcessorPil(patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2,
                             min_pixels=4 * factor * factor, max_pixels=256 * factor * factor).save_pretrained(out_dir)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _scale_random_weights(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Re-draw every weight with a larger scale so that greedy steps are far from ties."""
    gen = torch.Generator().manual_seed(seed + 1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[1] if p.ndim == 2 else p[0].numel()
                std = scale if "embed" in name or "position" in name else max(scale, 1.0 / fan_in**0.5) * 1.5
                p.copy_(std * torch.randn(p.shape, generator=gen))
