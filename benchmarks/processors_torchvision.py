"""How far transformers' torchvision-backend image processors are from its PIL-backend ones (our oracle), for each
family we serve; prints JSON.

For every family and image size: the largest absolute difference of the normalized pixels (PIL minus torchvision,
over the tiles both make) and whether the two backends give the same token layout (the tiles or patch grid the
visual-token count is a function of: LLaVA-NeXT / OneVision's `image_sizes` and tile count, Qwen2-VL's
`image_grid_thw`, Idefics3's rows and columns, Gemma 3's one view). Settings are the released checkpoints' (class
defaults; SmolVLM's 512 px tiles over a 2048 px longest edge for Idefics3, Gemma 3's 896 px).

vlmserve's own venv has no torchvision (it cannot load beside the CPU torch build there), so this runs under a venv
that has one, e.g. vLLM's: `/tmp/vllm-venv/bin/python benchmarks/processors_torchvision.py`. It imports nothing of
vlmserve.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SIZES = [(40, 90), (100, 30), (250, 240), (480, 640), (1000, 300), (7, 200)]  # (height, width)


def _picture(height: int, width: int, seed: int) -> Image.Image:
    """A smooth gradient with noise: resampling filters differ most on noise, least on smooth areas; both."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([255 * yy / max(height - 1, 1), 255 * xx / max(width - 1, 1), 128 + 0 * xx], axis=-1)
    noise = rng.normal(0, 40, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _layout(family: str, out: Any) -> Any:
    """What the visual-token count is a function of, per family."""
    if family in ("llava_next", "llava_onevision"):
        return [list(map(int, out["image_sizes"][0])), int(out["pixel_values"].shape[1])]
    if family == "qwen2_vl":
        return [int(x) for x in out["image_grid_thw"][0]]
    if family == "gemma3":  # one 896 px view (pan and scan off): its shape
        return list(out["pixel_values"].shape[1:])
    return [int(out["rows"][0][0]), int(out["cols"][0][0]), int(out["pixel_values"].shape[1])]


def _processors() -> dict[str, tuple[Callable[..., Any], Callable[..., Any], dict[str, Any]]]:
    from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_llava_onevision import LlavaOnevisionImageProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    smolvlm = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}}
    return {
        "llava_next": (LlavaNextImageProcessorPil, LlavaNextImageProcessor, {}),
        "llava_onevision": (LlavaOnevisionImageProcessorPil, LlavaOnevisionImageProcessor, {}),
        "qwen2_vl": (Qwen2VLImageProcessorPil, Qwen2VLImageProcessor, {}),
        "idefics3": (Idefics3ImageProcessorPil, Idefics3ImageProcessor, smolvlm),
        "gemma3": (Gemma3ImageProcessorPil, Gemma3ImageProcessor, {"size": {"height": 896, "width": 896}}),
    }


def measure(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    import transformers

    results: dict[str, Any] = {"transformers": transformers.__version__, "families": {}}
    for family, (pil_cls, tv_cls, kwargs) in _processors().items():
        pil, tv = pil_cls(**kwargs), tv_cls(**kwargs)
        extra = {"return_row_col_info": True} if family == "idefics3" else {}
        rows = []
        for i, (h, w) in enumerate(sizes):
            image = _picture(h, w, seed=i)
            images: Any = [[image]] if family == "idefics3" else [image]
            a = pil(images=images, return_tensors="pt", **extra)
            b = tv(images=images, return_tensors="pt", **extra)
            same_layout = _layout(family, a) == _layout(family, b)
            pa, pb = a["pixel_values"].float(), b["pixel_values"].float()
            diff = float((pa - pb).abs().max()) if pa.shape == pb.shape else None
            rows.append({"size": [h, w], "layout_pil": _layout(family, a), "layout_equal": same_layout,
                         "max_abs_pixel_diff": diff,
                         "mean_abs_pixel_diff": float((pa - pb).abs().mean()) if diff is not None else None})
            log.info("%s %dx%d: layout equal %s, max diff %s", family, h, w, same_layout, diff)
        diffs = [r["max_abs_pixel_diff"] for r in rows if r["max_abs_pixel_diff"] is not None]
        results["families"][family] = {
            "backends": [pil_cls.__name__, tv_cls.__name__],
            "layouts_equal": all(r["layout_equal"] for r in rows),
            "max_abs_pixel_diff": max(diffs) if diffs else None,
            "sizes": rows,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="two image sizes only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(measure(SIZES[:2] if args.small else SIZES), indent=1))


if __name__ == "__main__":
    main()
