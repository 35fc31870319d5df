"""Tiny random Idefics3 / SmolVLM and Gemma 3 checkpoints (tests/checkpoints.py's FAMILY_SPECS), built with
transformers' own model classes, PIL image processors and processors, and a tokenizer trained on the spot."""

from __future__ import annotations

from pathlib import Path

from checkpoints import IMAGE_TOKEN, TinySpec, _scale_random_weights, train_tokenizer
from transformers import LlamaConfig, PreTrainedTokenizerFast, SiglipVisionConfig

GEMMA3_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]
# Gemma 3's chat template, its image and text parts (the released one also folds a system turn into the first user's)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                   *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]
# SmolVLM's chat template
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _build_idefics3(spec: TinySpec, out_dir: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """transformers' Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil and Idefics3Processor."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=spec.image_size, patch_size=spec.patch_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=spec.max_positions,
                       rope_parameters=spec.rope, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), scale_factor=2)
    model = Idefics3ForConditionalGeneration(config).eval()
    _scale_random_weights(model, spec.init_scale, spec.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 4 * spec.image_size},
                                                max_image_size={"longest_edge": spec.image_size})
    seq_len = (spec.image_size // spec.patch_size // 2) ** 2
    tokenizer.chat_template = IDEFICS3_CHAT_TEMPLATE
    Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                      chat_template=IDEFICS3_CHAT_TEMPLATE).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _build_gemma3(spec: TinySpec, out_dir: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """transformers' Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil and Gemma3Processor."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": GEMMA3_TOKENS})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_TOKENS}
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=spec.image_size, patch_size=spec.patch_size, vision_use_head=False)
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=12,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=spec.max_positions,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokens = 16
    config = Gemma3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=tokens,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    model = Gemma3ForConditionalGeneration(config).eval()
    _scale_random_weights(model, spec.init_scale, spec.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    # pan and scan left off (null: `auto` is one view) and its other settings Gemma3Processor's, but crops from 16 px
    # (the released 256 px scaled to the 32 px view), so that small test images get them
    image_processor = Gemma3ImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size},
                                              pan_and_scan_min_crop_size=16)
    Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens,
                    chat_template=GEMMA3_CHAT_TEMPLATE).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_family_checkpoint(spec: TinySpec, out_dir: Path) -> Path:
    """Write the tiny checkpoint of an `idefics3` or `gemma3` spec into `out_dir` and return it."""
    if spec.family == "idefics3":
        return _build_idefics3(spec, out_dir, train_tokenizer(seed=spec.seed))
    return _build_gemma3(spec, out_dir, train_tokenizer(
        seed=spec.seed, image_token="<image_soft_token>",
        extra_special={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}))
