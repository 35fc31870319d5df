"""Tiny random audio checkpoints, built with transformers' own classes, its WhisperFeatureExtractor and a tokenizer
trained on the spot (tests/checkpoints.py's), and clips rendered in numpy; nothing is downloaded.

- `build_qwen2_audio`: `Qwen2AudioForConditionalGeneration` (Whisper-style encoder, one-Linear projector, Qwen2 LM) with
  its processor's ChatML template, saved as transformers saves it.
- `add_audio_tower`: a LLaVA checkpoint (tests/checkpoints.py) plus an audio tower and projector in `audio/`, so the
  same directory still loads in transformers as LLaVA while vlmserve hears too.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from checkpoints import _scale_random_weights, train_tokenizer
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    WhisperFeatureExtractor,
)

AUDIO_TOKENS = ["<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
# Qwen2AudioProcessor's default chat template (ChatML, each clip as "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>")
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MEL_BINS = 80
# A 5 s window (250 encoder positions) instead of Whisper's 30 s (1500): the same code at a sixth of the cost; the
# server takes the window from the checkpoint's feature extractor and refuses longer clips.
WINDOW_SECONDS = 5


def audio_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    tokenizer = train_tokenizer(seed=seed)
    tokenizer.add_special_tokens({"additional_special_tokens": AUDIO_TOKENS})
    return tokenizer


def tiny_encoder(seed: int) -> Qwen2AudioEncoderConfig:
    del seed
    return Qwen2AudioEncoderConfig(num_mel_bins=MEL_BINS, encoder_layers=2, encoder_attention_heads=4,
                                   encoder_ffn_dim=64, d_model=32, max_source_positions=WINDOW_SECONDS * 50)


def build_qwen2_audio(out_dir: Path, seed: int = 7) -> Path:
    """A tiny Qwen2-Audio checkpoint with its processor (Whisper features, 80 mel bins, a 5 s window)."""
    torch.manual_seed(seed)
    tokenizer = audio_tokenizer(seed)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = Qwen2AudioConfig(audio_config=tiny_encoder(seed).to_dict(), text_config=text.to_dict(),
                              audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    model = Qwen2AudioForConditionalGeneration(config).eval()
    _scale_random_weights(model, 0.25, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.chat_template = QWEN2_AUDIO_CHAT_TEMPLATE
    features = WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=WINDOW_SECONDS)
    processor = Qwen2AudioProcessor(feature_extractor=features,
                                    tokenizer=tokenizer, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# LLaVA-1.5's prompt with audio: each image or clip part on its own line, in the order given, then the text
LLAVA_AUDIO_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'audio' %}<|AUDIO|>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] if message['content'] is "
    "string else message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_llava_audio(out_dir: Path) -> Path:
    """tests/checkpoints.py's CLIP + Llama LLaVA with an `<|AUDIO|>` token (its embedding table grown by one row,
    with transformers' `resize_token_embeddings`), a template that places clips, and an audio tower in `audio/`."""
    from checkpoints import SPECS, build_checkpoint
    from transformers import LlavaForConditionalGeneration

    ckpt = build_checkpoint(SPECS["clip-llama"], out_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|AUDIO|>"]})
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(ckpt)
    tokenizer.chat_template = LLAVA_AUDIO_CHAT_TEMPLATE
    tokenizer.save_pretrained(ckpt)
    for stale in ("chat_template.json", "chat_template.jinja"):
        (ckpt / stale).unlink(missing_ok=True)
    (ckpt / "chat_template.jinja").write_text(LLAVA_AUDIO_CHAT_TEMPLATE)
    processor = json.loads((ckpt / "processor_config.json").read_text())
    processor.pop("chat_template", None)
    (ckpt / "processor_config.json").write_text(json.dumps(processor, indent=2))
    add_audio_tower(ckpt)
    return ckpt


def add_audio_tower(ckpt: Path, seed: int = 8) -> Path:
    """Give a LLaVA checkpoint an audio tower and projector in `audio/` (weights taken from a Qwen2-Audio model of
    the same LM width built with transformers' classes), an `<|AUDIO|>` token and a template that places clips."""
    from safetensors.torch import save_file

    llava = json.loads((ckpt / "config.json").read_text())
    width = llava["text_config"]["hidden_size"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
    if "<|AUDIO|>" not in tokenizer.get_vocab():
        raise ValueError("the LLaVA checkpoint's tokenizer needs an <|AUDIO|> token (build it with one)")
    torch.manual_seed(seed)
    text = Qwen2Config(vocab_size=8, hidden_size=width, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1)
    donor = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(audio_config=tiny_encoder(seed).to_dict(),
                                                                text_config=text.to_dict())).eval()
    _scale_random_weights(donor, 0.25, seed)
    state = {k.removeprefix("model."): v.contiguous() for k, v in donor.state_dict().items()
             if k.startswith(("model.audio_tower.", "model.multi_modal_projector."))}
    out = ckpt / "audio"
    out.mkdir(exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({
        "audio_config": tiny_encoder(seed).to_dict(), "projector_type": "linear",
        "audio_token_index": tokenizer.convert_tokens_to_ids("<|AUDIO|>")}, indent=2))
    WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=WINDOW_SECONDS).save_pretrained(out)
    return out


def tone_clip(seconds: float, rate: int, *, freq: float = 440.0, channels: int = 1, fmt: str = "WAV",
              seed: int = 0) -> bytes:
    """A sine with a little noise, as WAV/FLAC/MP3 bytes (16-bit PCM where the format has it)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.5 * np.sin(2 * math.pi * freq * t) + 0.01 * rng.standard_normal(len(t))
    wave = np.stack([mono * (1 - 0.2 * c) for c in range(channels)], axis=1)  # (N, C)
    buf = io.BytesIO()
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "MP3": "MPEG_LAYER_III"}[fmt]
    sf.write(buf, wave.astype(np.float32), rate, format=fmt, subtype=subtype)
    return buf.getvalue()
