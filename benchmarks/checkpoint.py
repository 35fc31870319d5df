"""Benchmark checkpoints: random LLaVA-format models built with transformers' own classes, nothing downloaded.

Two variants share one trained byte-level BPE tokenizer (about 4k tokens) and one Llama text model:

- ``main``: a CLIP ViT (112 px, patch 14: 64 visual tokens) in front of the LM; the LM's prefill and decode are
  most of the cost (the headline throughput / TTFT / single-stream numbers);
- ``encoder-heavy``: a CLIP ViT-B/16-shaped encoder (224 px, patch 16: 196 visual tokens, 12 layers of 768), so
  that encoding an image is a large share of a request's time to first token (the repeated-image measurement).

Every request generates exactly ``max_tokens`` on every system: the ``lm_head`` rows of the special tokens (EOS
among them) and of the 128 lone non-ASCII byte tokens are zero, so their logits are exactly 0, while the other
~4k logits come from random rows and their maximum is always > 0 (`verify_eos_unreachable` checks this on the
checkpoint it builds). Greedy decoding therefore never picks EOS and every token decodes to visible text.

    python benchmarks/checkpoint.py --out /tmp/bench-ckpt            # both variants, full size
    python benchmarks/checkpoint.py --out /tmp/bench-ckpt --small    # a reduced pair for a dry run
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.checkpoints import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, SPECIAL_TOKENS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSpec:
    """Sizes of one benchmark checkpoint."""

    name: str
    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 384
    vision_layers: int = 6
    vision_heads: int = 6
    text_hidden: int = 512
    text_layers: int = 6
    text_heads: int = 8
    text_kv_heads: int = 4
    vocab_size: int = 4096
    max_positions: int = 1024
    seed: int = 0

    @property
    def num_visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # strategy "default": CLS dropped


MAIN = BenchSpec(name="bench-main")
ENCODER_HEAVY = BenchSpec(
    name="bench-encoder-heavy", image_size=224, patch_size=16, vision_hidden=768, vision_layers=12, vision_heads=12,
    seed=1,
)
SMALL = {  # the dry-run pair: same shapes of problem, a fraction of the math
    "main": replace(MAIN, name="bench-main-small", image_size=56, vision_hidden=128, vision_layers=2,
                    vision_heads=4, text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, vocab_size=1024),
    "encoder-heavy": replace(ENCODER_HEAVY, name="bench-encoder-heavy-small", image_size=112, vision_hidden=384,
                             vision_layers=4, vision_heads=6, text_hidden=128, text_layers=2, text_heads=4,
                             text_kv_heads=2, vocab_size=1024),
}
FULL = {"main": MAIN, "encoder-heavy": ENCODER_HEAVY}
# The checkpoint of the vLLM comparison (bench_vllm.py): CLIP 224/16 6 x 384 (196 visual tokens), Llama 12 x 512,
# GQA 8/4, MLP 1536, vocabulary 8192: 58 M parameters, the LM most of them.
PEER = BenchSpec(name="bench-peer", image_size=224, patch_size=16, vision_hidden=384, vision_layers=6, vision_heads=6,
                 text_hidden=512, text_layers=12, text_heads=8, text_kv_heads=4, vocab_size=8192, max_positions=4096,
                 seed=2)
PEER_SMALL = replace(PEER, name="bench-peer-small", image_size=112, vision_layers=2, text_layers=2, vocab_size=1024)

_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "st", "ng", "qu"]
_PROMPT_WORDS = ["describe", "the", "picture", "number", "what", "color", "is", "this", "image", "shape"]


def _corpus(seed: int, lines: int = 6000, num_words: int = 3000) -> list[str]:
    """ASCII pseudo-words (so that every merged token is plain ASCII) plus the words of the benchmark prompts."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(num_words)]
    words += _PROMPT_WORDS * 30 + [str(i) for i in range(100)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) + rng.choice(".?!,") for _ in range(lines)]


def train_tokenizer(vocab_size: int, seed: int = 0, image_token: str = IMAGE_TOKEN) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a synthetic ASCII corpus, wrapped for transformers (like tests/checkpoints.py)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # a vocabulary past ~6k merges needs more distinct words than the 3000 the smaller checkpoints were built with
    num_words = 3000 if vocab_size <= 4096 else 2 * vocab_size
    tok.train_from_iterator(_corpus(seed, lines=max(6000, 2 * num_words), num_words=num_words), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": image_token})
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


def silent_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids that must never be generated: special tokens (EOS among them) and lone bytes >= 0x80 (half a character)."""
    ids = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the byte-level BPE
    vocab = tokenizer.get_vocab()
    for ch in byte_to_char:
        raw = tokenizer.backend_tokenizer.decoder.decode([ch])
        if raw == "\ufffd" and ch in vocab:  # a byte that is not a character on its own
            ids.add(vocab[ch])
    return sorted(ids)


def build(spec: BenchSpec, out_dir: Path) -> Path:
    """Write the checkpoint of `spec` to `out_dir` (config, safetensors, tokenizer, processor, chat template)."""
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(spec.vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=3 * spec.text_hidden,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=spec.num_visual_tokens, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config).eval()
    silent = silent_token_ids(tokenizer)
    with torch.no_grad():
        model.lm_head.weight[silent] = 0.0  # their logits are exactly 0; the max of the others is > 0
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, \
        tokenizer.bos_token_id
    gen.do_sample = False
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    classic_keys(out_dir)
    crop = {"height": spec.image_size, "width": spec.image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": spec.image_size}, crop_size=crop),
        tokenizer=tokenizer, patch_size=spec.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    params = {
        "vision": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        "language": sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel(),
    }
    (out_dir / "bench_spec.json").write_text(json.dumps(
        {**asdict(spec), "num_visual_tokens": spec.num_visual_tokens, "vocab": len(tokenizer), "params": params,
         "silent_token_ids": len(silent)}, indent=1))
    log.info("built %s in %s: %s", spec.name, out_dir, params)
    return out_dir


def classic_keys(out_dir: Path) -> None:
    """Rename the vision tower's tensors to the hub's classic llava-hf names (`vision_tower.vision_model.*`): recent
    transformers saves `vision_tower.*`, which vLLM 0.32 cannot load; transformers and vlmserve read both."""
    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    renamed = {("vision_tower.vision_model." + k.removeprefix("vision_tower."))
               if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k: v
               for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


@torch.inference_mode()
def verify_eos_unreachable(model: LlavaForConditionalGeneration, silent: list[int], steps: int = 64,
                           seed: int = 0) -> float:
    """The smallest margin (max logit of the allowed tokens) over random hidden states fed to the final norm and
    the LM head: > 0 means a silent token (EOS) can never win a greedy step. Raises if it is not > 0."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(steps, model.config.text_config.hidden_size, generator=gen)
    logits = model.lm_head(model.model.language_model.norm(hidden))  # (S, V)
    assert torch.all(logits[:, silent] == 0), "silent rows must give exact zeros"
    allowed = torch.ones(logits.shape[-1], dtype=torch.bool)
    allowed[silent] = False
    margin = float(logits[:, allowed].max(dim=-1).values.min())
    if margin <= 0:
        raise AssertionError(f"EOS reachable: an allowed max logit of {margin}")
    return margin


def ensure(spec: BenchSpec, out_root: Path) -> Path:
    """The checkpoint of `spec` under `out_root`, built and verified if missing."""
    path = out_root / spec.name
    if not (path / "bench_spec.json").is_file():
        build(spec, path)
        model = LlavaForConditionalGeneration.from_pretrained(path).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        margin = verify_eos_unreachable(model, silent_token_ids(tokenizer))
        log.info("%s: EOS unreachable (smallest max allowed logit %.3f)", spec.name, margin)
    return path


def build_all(out_root: Path, *, small: bool = False) -> dict[str, Path]:
    """Both variants under `out_root` (rebuilt only if missing), verified; returns {variant: directory}."""
    return {variant: ensure(spec, out_root) for variant, spec in (SMALL if small else FULL).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory that receives one folder per variant")
    p.add_argument("--small", action="store_true", help="the reduced pair (dry runs)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    paths = build_all(args.out, small=args.small)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
