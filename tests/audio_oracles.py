"""transformers as the oracle of the audio models (tests/test_audio.py): Qwen2-Audio's own class and processor, and
for the LLaVA checkpoint with an `audio/` tower, transformers' LLaVA plus its `Qwen2AudioEncoder` with the folder's
weights, their features placed at the placeholders as each model places its own, then LLaVA's greedy generate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    Qwen2AudioEncoder,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    WhisperFeatureExtractor,
)


def audio_messages(parts: list[str], question: str) -> list[dict[str, Any]]:
    """One user turn: the media parts ("image" / "audio") in order, then the question."""
    content: list[dict[str, Any]] = [{"type": "audio", "audio": ""} if p == "audio" else {"type": "image"}
                                     for p in parts]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


class Qwen2AudioOracle:
    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        self.model = Qwen2AudioForConditionalGeneration.from_pretrained(ckpt).eval()
        self.processor = AutoProcessor.from_pretrained(ckpt)
        self.tokenizer = self.processor.tokenizer

    def inputs(self, question: str, clips: list[np.ndarray], images: list[Image.Image] = (),
               parts: list[str] | None = None) -> dict[str, Any]:
        del images, parts  # no vision tower
        text = self.processor.apply_chat_template(audio_messages(["audio"] * len(clips), question),
                                                  add_generation_prompt=True, tokenize=False)
        return dict(self.processor(text=text, audio=clips, return_tensors="pt", sampling_rate=16000))

    def answer(self, question: str, clips: list[np.ndarray], images: list[Image.Image] = (),
               parts: list[str] | None = None, max_new_tokens: int = 10) -> tuple[list[int], int]:
        inputs = self.inputs(question, clips, images, parts)
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, n:].tolist(), n


class LlavaAudioOracle:
    """LLaVA from transformers; the audio tower is transformers' Qwen2AudioEncoder with `audio/`'s weights."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        self.model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
        self.image_processor = AutoProcessor.from_pretrained(ckpt).image_processor
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt)
        audio = json.loads((ckpt / "audio" / "config.json").read_text())
        self.audio_token_id = audio["audio_token_index"]
        state = load_file(str(ckpt / "audio" / "model.safetensors"))
        self.encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**audio["audio_config"])).eval()
        self.encoder.load_state_dict({k.removeprefix("audio_tower."): v for k, v in state.items()
                                      if k.startswith("audio_tower.")})
        self.projector = torch.nn.Linear(*state["multi_modal_projector.linear.weight"].shape[::-1])
        self.projector.load_state_dict({"weight": state["multi_modal_projector.linear.weight"],
                                        "bias": state["multi_modal_projector.linear.bias"]})
        self.features = WhisperFeatureExtractor.from_pretrained(ckpt / "audio")

    def _audio_tokens(self, clip: np.ndarray) -> torch.Tensor:
        f = self.features(clip, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                          return_tensors="pt")
        frames = int(f["attention_mask"].sum())
        conv, n = self.encoder._get_feat_extract_output_lengths(torch.tensor(frames))
        positions = torch.arange(self.encoder.config.max_source_positions)
        mask = (positions < conv)[None, None, None, :]  # padding keys masked, as Qwen2-Audio does
        bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        states = self.encoder(f["input_features"], attention_mask=bias).last_hidden_state[0]  # (P / 2, D)
        return self.projector(states[: int(n)])  # (n, D)

    def inputs(self, question: str, clips: list[np.ndarray], images: list[Image.Image] = (),
               parts: list[str] | None = None) -> dict[str, Any]:
        parts = parts or ["image"] * len(images) + ["audio"] * len(clips)
        prompt = self.tokenizer.apply_chat_template(audio_messages(parts, question), add_generation_prompt=True,
                                                    tokenize=False)
        n_image = self.model.config.image_seq_length
        with torch.no_grad():
            audio = [self._audio_tokens(c) for c in clips]
            prompt = prompt.replace("<image>", "<image>" * n_image)
            pieces = prompt.split("<|AUDIO|>")
            prompt = pieces[0] + "".join("<|AUDIO|>" * len(a) + rest for a, rest in zip(audio, pieces[1:], strict=True))
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
            embeds = self.model.get_input_embeddings()(ids)  # (1, T, D)
            if images:
                pixels = self.image_processor(images, return_tensors="pt")["pixel_values"]
                visual = self.model.model.get_image_features(
                    pixel_values=pixels, vision_feature_layer=self.model.config.vision_feature_layer,
                    vision_feature_select_strategy=self.model.config.vision_feature_select_strategy).pooler_output
                embeds = embeds.masked_scatter((ids == self.model.config.image_token_index)[..., None],
                                               torch.cat(list(visual)))
            if audio:
                embeds = embeds.masked_scatter((ids == self.audio_token_id)[..., None], torch.cat(audio))
        return {"input_ids": ids, "inputs_embeds": embeds, "attention_mask": torch.ones_like(ids)}

    def answer(self, question: str, clips: list[np.ndarray], images: list[Image.Image] = (),
               parts: list[str] | None = None, max_new_tokens: int = 10) -> tuple[list[int], int]:
        inputs = self.inputs(question, clips, images, parts)
        with torch.no_grad():
            out = self.model.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                      max_new_tokens=max_new_tokens, do_sample=False)
        return out[0].tolist(), inputs["input_ids"].shape[1]
