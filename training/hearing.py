"""Teaching the shipped SHAPES model to hear: an audio tower and projector trained on the SOUNDS world beside it.

Starts from a finished vision-language model (`weights/shapes-llava`) and adds, in three resumable stages:

0. `hear`          a Whisper-style encoder (model/audio.py) pretrained with dense per-token labels  -> hear.pt
1. `hear-align`    encoder + LM frozen, the audio projector trained on captions                     -> hear-align.pt
2. `hear-instruct` audio projector + LM on both worlds' question mixes (vision tower and projector
                   frozen, both encoders' outputs cached once)                   -> hear-instruct.pt, model/

The export keeps the LLaVA layout that transformers and vLLM load (the LM's tables grow by one row for the
`<|AUDIO|>` placeholder) and writes the audio tower, its projector and its Whisper feature extractor in `audio/`.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.model.audio import AudioEncoder
from vlmserve.model.audio_config import AudioConfig, AudioEncoderConfig
from vlmserve.model.audio_decode import AudioLimits, decode_audio
from vlmserve.model.audio_features import AudioFeatureConfig, FeatureExtractor
from vlmserve.model.tokenizer import DEFAULT_AUDIO_TOKEN, ChatTokenizer
from vlmserve.model.vlm import VisionLanguageModel
from vlmserve.model.weights import load_model

from . import sounds
from .hearing_recipe import HearingRecipe
from .loop import train_loop

log = logging.getLogger(__name__)

HEARING_STAGES: tuple[str, ...] = ("hear", "hear-align", "hear-instruct")
_IMAGE_PART = "{% if part['type'] == 'image' %}<image>\n{% endif %}"
_MEDIA_PARTS = "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'audio' %}<|AUDIO|>\n{% endif %}"


class TokenHeads(nn.Module):
    """LayerNorm then one Linear per target on every audio token (sounds.TARGETS); discarded after stage 0."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in sounds.TARGETS})

    def loss(self, states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed cross-entropy; states (N, T, D), labels (N, 5, T) with -100 on padding tokens."""
        x = self.norm(states)  # (N, T, D)
        total, acc = states.new_zeros(()), {}
        for i, (name, _) in enumerate(sounds.TARGETS):
            logits, target = self.heads[name](x), labels[:, i]  # (N, T, C), (N, T)
            total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
            keep = target >= 0
            acc[name] = float((logits.argmax(-1)[keep] == target[keep]).float().mean())
        return total, acc


@dataclass
class AudioPool:
    """Rendered clips: features (N, M, F) float16 as the server computes them, valid frames, labels (N, 5, T)."""

    clips: list[sounds.Clip]
    features: torch.Tensor
    frames: list[int]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.clips)


def render_audio_pool(n: int, seed: int, extractor: FeatureExtractor, encoder: AudioEncoderConfig) -> AudioPool:
    """`n` clips from `seed`, each written as WAV and read back through the serving decoder and feature extractor."""
    rng = random.Random(seed)
    limits = AudioLimits(max_seconds=extractor.config.chunk_length)
    n_tokens = encoder.num_tokens(encoder.num_frames)
    clips, frames = [], []
    features = torch.empty(n, encoder.num_mel_bins, encoder.num_frames, dtype=torch.float16)  # (N, M, F)
    labels = torch.empty(n, 5, n_tokens, dtype=torch.long)  # (N, 5, T)
    for i in range(n):
        clip = sounds.random_clip(rng)
        wave = decode_audio(sounds.wav_bytes(clip, rng), limits, extractor.config.sampling_rate)  # (S,)
        feats, valid = extractor(wave)  # (M, F)
        features[i] = torch.from_numpy(feats)
        labels[i] = torch.from_numpy(sounds.token_labels(clip, n_tokens, encoder.num_tokens(valid)))
        clips.append(clip)
        frames.append(valid)
    return AudioPool(clips, features, frames, labels)


@dataclass
class HearingRun:
    """A run directory: the base model's text side with the audio placeholder, the configs and the pools."""

    recipe: HearingRecipe
    dir: Path
    resume: bool = True
    _cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "recipe.json").write_text(self.recipe.to_json())
        self.base = Path(self.recipe.base)
        self.text_dir = self.dir / "text"
        if not (self.text_dir / "tokenizer.json").is_file():
            _write_text_side(self.base, self.text_dir)
        self.chat = ChatTokenizer.from_pretrained(self.text_dir)
        token_id = self.chat.tokenizer.convert_tokens_to_ids(DEFAULT_AUDIO_TOKEN)
        assert isinstance(token_id, int)
        self.audio_token_id = token_id
        r = self.recipe
        self.encoder_config = AudioEncoderConfig(
            num_mel_bins=r.mel_bins, d_model=r.audio_hidden, encoder_layers=r.audio_layers,
            encoder_attention_heads=r.audio_heads, encoder_ffn_dim=r.audio_intermediate,
            max_source_positions=r.window_seconds * 50)
        self.audio_config = AudioConfig(self.encoder_config, audio_token_index=self.audio_token_id,
                                        projector=r.projector)  # type: ignore[arg-type]
        config_file = self.text_dir / "audio" / "config.json"
        if not config_file.is_file():  # the serving tokenizer reads the audio slots' id from here
            config_file.parent.mkdir(parents=True, exist_ok=True)
            config_file.write_text(json.dumps(self.audio_config.to_hf(), indent=2) + "\n")
            self.chat = ChatTokenizer.from_pretrained(self.text_dir)
        features = AudioFeatureConfig(feature_size=r.mel_bins, chunk_length=r.window_seconds)
        self.extractor = FeatureExtractor(features)
        _write_feature_extractor(self.text_dir / "audio", features)
        self.summary_path = self.dir / "summary.json"
        self.summary: dict[str, Any] = json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else {}

    def record(self, key: str, value: object) -> None:
        self.summary[key] = value
        self.summary_path.write_text(json.dumps(self.summary, indent=2))

    def step_rng(self, stage: str, step: int) -> random.Random:
        return random.Random(f"{self.recipe.seed}/{stage}/{step}")

    def audio_pool(self, which: str) -> AudioPool:
        """`hear` (stage 0), `lm` (stages 1-2) or `heldout` clips, rendered once per process."""
        if which not in self._cache:
            n = {"hear": self.recipe.hear_pool, "lm": self.recipe.lm_pool, "heldout": self.recipe.heldout}[which]
            seed = self.recipe.seed * 1000 + {"hear": 11, "lm": 12, "heldout": 13}[which]
            t0 = time.perf_counter()
            self._cache[which] = render_audio_pool(n, seed, self.extractor, self.encoder_config)
            log.info("rendered the %s audio pool: %d clips in %.1fs", which, n, time.perf_counter() - t0)
        return self._cache[which]  # type: ignore[no-any-return]

    def model(self) -> VisionLanguageModel:
        """The base model with the audio tower (random) and the LM's tables grown by the placeholder's row."""
        key = "base_state"
        if key not in self._cache:
            self._cache[key] = load_model(self.base, dtype=torch.float32).state_dict()
        state = {k: v for k, v in self._cache[key].items() if not k.startswith("audio.")}  # a tower of its own
        base_vocab = state["language_model.embed_tokens.weight"].shape[0]
        vocab = len(self.chat.tokenizer)
        for name in ("language_model.embed_tokens.weight", "language_model.lm_head.weight"):
            table = state[name]  # (V, D)
            grown = table.mean(0, keepdim=True).expand(vocab - base_vocab, -1)  # (V' - V, D)
            state[name] = torch.cat([table, grown])  # (V', D)
        base = load_model(self.base, dtype=torch.float32).config
        config = replace(base, text=replace(base.text, vocab_size=vocab), audio=self.audio_config)
        torch.manual_seed(self.recipe.seed)
        model = VisionLanguageModel(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("audio.") for k in missing):
            raise ValueError(f"the base model does not fit: missing {missing}, unexpected {unexpected}")
        return model


def _write_text_side(base: Path, out: Path) -> None:
    """The base model's tokenizer with `<|AUDIO|>` added, its template placing clips, its other text files."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja") and f.name != "config.json" and "safetensors" not in f.name:
            shutil.copy2(f, out / f.name)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": [DEFAULT_AUDIO_TOKEN]})
    tokenizer.save_pretrained(out)
    template = (base / "chat_template.jinja").read_text()
    if _MEDIA_PARTS not in template:  # a base that hears already keeps its template
        if template.count(_IMAGE_PART) != 1:
            raise ValueError(f"{base}'s chat template has no single image-part branch to extend with audio")
        template = template.replace(_IMAGE_PART, _MEDIA_PARTS)
    (out / "chat_template.jinja").write_text(template)


def _write_feature_extractor(folder: Path, c: AudioFeatureConfig) -> None:
    """transformers' WhisperFeatureExtractor config for the window (written once, copied at export)."""
    from transformers import WhisperFeatureExtractor

    if not (folder / "preprocessor_config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        WhisperFeatureExtractor(feature_size=c.feature_size, sampling_rate=c.sampling_rate, hop_length=c.hop_length,
                                n_fft=c.n_fft, chunk_length=c.chunk_length).save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- stage 0


def train_hear(run: HearingRun) -> dict[str, Any]:
    """Pretrain the audio encoder to label every audio token (pair, pitch, kind, time rank, count)."""
    torch.manual_seed(run.recipe.seed)
    encoder = AudioEncoder(run.encoder_config)
    heads = TokenHeads(dim=run.encoder_config.d_model)
    pool, budget = run.audio_pool("hear"), run.recipe.hear
    frames = torch.tensor(pool.frames)

    def step(i: int) -> tuple[torch.Tensor, int]:
        idx = torch.tensor(run.step_rng("hear", i).sample(range(len(pool)), budget.batch))
        states = encoder(pool.features[idx].float(), frames[idx])  # (B, T, D)
        loss, _ = heads.loss(states, pool.labels[idx])
        return loss, budget.batch

    params = [{"params": [*encoder.parameters(), *heads.parameters()]}]
    out = train_loop("hear", run.dir, {"encoder": encoder, "heads": heads}, params, budget, step, resume=run.resume)
    held = run.audio_pool("heldout")
    with torch.no_grad():
        _, acc = heads.loss(encoder(held.features.float(), torch.tensor(held.frames)), held.labels)
    out["heldout_token_accuracy"] = {k: round(v, 4) for k, v in acc.items()}
    log.info("hear: held-out token accuracy %s", out["heldout_token_accuracy"])
    torch.save(encoder.state_dict(), run.dir / "hear.pt")
    return out
