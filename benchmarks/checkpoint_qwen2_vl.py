"""The Qwen2-VL benchmark checkpoint (issue 11): random weights built with transformers' own classes, nothing
downloaded, saved in the Hub layout (`model.*`, `visual.*`, `lm_head`) so that vLLM's CPU build loads it too.

The LM is engine v2's benchmark LM as Qwen2 (12 x 512, GQA 8/4, MLP 1536, vocabulary 8192, head_dim 64, M-RoPE
sections 8/12/12); the vision tower costs about what the LLaVA benchmark's CLIP 224/16 6 x 384 does (6 x 384, 6
heads, patch 14, 2 x 2 merge), at each image's own resolution: the benchmark's mixed image sizes become 24 to 196
visual tokens. As in checkpoint.py, EOS and the lone non-ASCII bytes are unreachable (zeroed `lm_head` rows), so
every request generates exactly `max_tokens`.

    python benchmarks/checkpoint_qwen2_vl.py --out /tmp/vlmserve-bench
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.checkpoint import silent_token_ids, train_tokenizer
from tests.checkpoints import QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_TOKENS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QwenSpec:
    name: str = "bench-qwen2-vl"
    vision_dim: int = 384
    vision_layers: int = 6
    vision_heads: int = 6
    patch_size: int = 14
    text_hidden: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_kv_heads: int = 4
    vocab_size: int = 8192
    max_positions: int = 4096
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    seed: int = 3


PEER = QwenSpec()
PEER_SMALL = replace(PEER, name="bench-qwen2-vl-small", vision_layers=2, text_layers=2, vocab_size=1024)


def build(spec: QwenSpec, out_dir: Path) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(spec.vocab_size, image_token="<|image_pad|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_VL_TOKENS})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_TOKENS}
    vision = Qwen2VLVisionConfig(depth=spec.vision_layers, embed_dim=spec.vision_dim, hidden_size=spec.text_hidden,
                                 hidden_act="quick_gelu", mlp_ratio=4, num_heads=spec.vision_heads,
                                 patch_size=spec.patch_size, spatial_merge_size=2, temporal_patch_size=2)
    text = Qwen2VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=3 * spec.text_hidden,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(spec.mrope_section)},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Qwen2VLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(config).eval()
    silent = sorted(set(silent_token_ids(tokenizer)) | set(ids.values()))
    with torch.no_grad():
        model.lm_head.weight[silent] = 0.0  # their logits are exactly 0; the max of the others is > 0
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = (tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                            tokenizer.bos_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2,
                             min_pixels=spec.min_pixels, max_pixels=spec.max_pixels).save_pretrained(out_dir)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    lm = model.model.language_model
    params = {"vision": sum(p.numel() for p in model.model.visual.parameters()),
              "language": sum(p.numel() for p in lm.parameters()) + model.lm_head.weight.numel()}
    (out_dir / "bench_spec.json").write_text(json.dumps({**asdict(spec), "family": "qwen2_vl", "params": params,
                                                         "vocab": len(tokenizer), "silent_token_ids": len(silent)},
                                                        indent=1))
    log.info("built %s in %s: %s", spec.name, out_dir, params)
    return out_dir


def ensure(spec: QwenSpec, out_root: Path) -> Path:
    path = out_root / spec.name
    if not (path / "bench_spec.json").is_file():
        build(spec, path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--small", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(json.dumps({"checkpoint": str(ensure(PEER_SMALL if args.small else PEER, args.out))}))


if __name__ == "__main__":
    main()
