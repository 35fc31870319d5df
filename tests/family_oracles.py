"""transformers as the oracle of each VLM family (tests/test_families.py): its model, its PIL image processor and its
placeholder expansion, on a tiny checkpoint of tests/checkpoints.py's FAMILY_SPECS."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Idefics3ForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from vlmserve.model.idefics3 import split_layout
from vlmserve.model.images import ImageProcessor
from vlmserve.model.qwen2_vision import smart_resize
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.weights import load_model
from vlmserve.server.engine.plan_idefics3 import Idefics3Planner
from vlmserve.server.engine.prepare import RequestPreparer


def messages(n_images: int, question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


class Oracle:
    """What every family answers: generate inputs, greedy answers, logits, and the pixel check."""

    hf_class: type

    def __init__(self, ckpt: Path, dtype: torch.dtype = torch.float32) -> None:
        self.ckpt, self.dtype = ckpt, dtype
        self.model = self.hf_class.from_pretrained(ckpt, dtype=dtype).eval()

    def inputs(self, question: str, images: list[Image.Image], detail: str | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def answer(self, question: str, images: list[Image.Image], detail: str | None = None,
               max_new_tokens: int = 12) -> tuple[list[int], int]:
        """transformers' greedy continuation (token ids) and the prompt's length."""
        inputs = self.inputs(question, images, detail)
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, n:].tolist(), n

    def next_logits(self, inputs: dict[str, Any], continuation: list[int]) -> torch.Tensor:
        """The logits (V,) after the prompt and `continuation`."""
        ids = torch.cat([inputs["input_ids"], torch.tensor([continuation], dtype=torch.long)], dim=1)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "inputs_embeds", "mm_token_type_ids")}
        if "inputs_embeds" in inputs:  # the prompt as embeddings, then the continuation's own
            tail = self.model.get_input_embeddings()(torch.tensor([continuation], dtype=torch.long))
            extra["inputs_embeds"] = torch.cat([inputs["inputs_embeds"], tail], dim=1)
            return self.model(**extra).logits[0, -1].float()
        if "mm_token_type_ids" in inputs:
            extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                    torch.zeros(1, len(continuation), dtype=torch.int)], dim=1)
        return self.model(input_ids=ids, **extra).logits[0, -1].float()

    def served_ids(self, inputs: dict[str, Any]) -> list[int]:
        """The prompt ids as our engine holds them (the same as transformers' unless a family's image span holds
        text tokens, whose rows the image's visual tokens carry)."""
        return list(inputs["input_ids"][0].tolist())

    def image_tokens(self, inputs: dict[str, Any]) -> int:
        """The prompt's image tokens as our usage counts them: its slots as our engine holds them."""
        config = self.model.config
        token = config.image_token_id if getattr(config, "image_token_id", None) is not None else (
            config.image_token_index)
        return self.served_ids(inputs).count(token)

    def check_pixels(self, image: Image.Image) -> int:
        """Assert our pixels are transformers' bit for bit and our encoder its features; return the token count."""
        raise NotImplementedError


class LlavaNextOracle(Oracle):
    hf_class = LlavaNextForConditionalGeneration

    def __init__(self, ckpt: Path, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(ckpt, dtype)
        self.processor = AutoProcessor.from_pretrained(ckpt)

    def inputs(self, question: str, images: list[Image.Image], detail: str | None = None) -> dict[str, Any]:
        prompt = self.processor.apply_chat_template(messages(len(images), question), add_generation_prompt=True)
        if detail != "low":
            out = dict(self.processor(images=images, text=[prompt], return_tensors="pt"))
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
            return out
        # detail low: each image as its base tile only, through transformers' own single-tile branch of
        # pack_image_features, the LM on the merged embeddings
        m = self.model
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"][:, :1]
        side = m.config.vision_config.image_size // m.config.vision_config.patch_size
        token = self.processor.image_token
        expanded = prompt.replace(token, token * (side * side + 1))
        ids = self.processor.tokenizer(expanded, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = m.model.vision_tower(pixels.flatten(0, 1).to(self.dtype), output_hidden_states=True).hidden_states
            feats = m.model.multi_modal_projector(hidden[m.config.vision_feature_layer][:, 1:])  # (N, S*S, D)
            packed, _ = m.model.pack_image_features(list(feats[:, None]), torch.tensor([[1, 1]] * len(images)),
                                                    "default", m.model.image_newline)
            embeds = m.get_input_embeddings()(ids.masked_fill(ids == m.config.image_token_index, 0))
            embeds = embeds.masked_scatter((ids == m.config.image_token_index)[..., None], torch.cat(packed))
        return {"input_ids": ids, "inputs_embeds": embeds}

    def check_pixels(self, image: Image.Image) -> int:
        ours = load_model(self.ckpt)
        assert ours.anyres is not None
        want = self.processor.image_processor(images=[image], return_tensors="pt")
        layout = ours.anyres.layout(image.height, image.width)
        got = ImageProcessor.from_pretrained(self.ckpt).preprocess_tiled(image, layout, ours.anyres.tile)
        assert torch.equal(got, want["pixel_values"][0][: got.shape[0]])  # bit for bit (the rest is batch padding)
        text = self.processor(images=[image], text=["<image>"], return_tensors="pt")
        placeholders = int((text["input_ids"] == self.model.config.image_token_index).sum())
        assert ours.anyres.num_tokens(layout) == placeholders
        with torch.no_grad():
            theirs = self.model.model.get_image_features(pixel_values=want["pixel_values"],
                                                         image_sizes=want["image_sizes"],
                                                         return_dict=True).pooler_output[0]
            mine = ours.encode_tiled(got[None], [layout])[0]
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)  # float32 sums in another order
        return placeholders


class LlavaOnevisionOracle(LlavaNextOracle):
    """LlavaOnevisionProcessor needs a video processor (hence torchvision): its <image> expansion is transformers'
    own `_get_number_of_features` called on the image processor, and S x S + 1 for each image of a multi-image
    prompt (one tile each, as the processor and the model do)."""

    hf_class = LlavaOnevisionForConditionalGeneration

    def __init__(self, ckpt: Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
        from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

        Oracle.__init__(self, ckpt, dtype)
        self.image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(ckpt)
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt)
        v = self.model.config.vision_config
        self.side = v.image_size // v.patch_size
        ns = SimpleNamespace(image_processor=self.image_processor, num_image_tokens=self.side**2,
                             vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        ns._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(ns, *a)
        self._count = lambda h, w: LlavaOnevisionProcessor._get_number_of_features(ns, h, w, v.image_size,
                                                                                    v.image_size)

    def inputs(self, question: str, images: list[Image.Image], detail: str | None = None) -> dict[str, Any]:
        prompt = self.tokenizer.apply_chat_template(messages(len(images), question), add_generation_prompt=True,
                                                    tokenize=False)
        single = len(images) == 1 and detail != "low"
        # a one-tile image is processed as the processor does the images of a multi-image prompt
        pixels = dict(self.image_processor(images=[images if len(images) > 1 else [images[0], images[0]]],
                                           return_tensors="pt")) if not single else {}
        counts = ([self._count(images[0].height, images[0].width)] if single else [self.side**2 + 1] * len(images))
        for n in counts:
            prompt = prompt.replace("<image>", "<placeholder>" * n, 1)
        ids = self.tokenizer(prompt.replace("<placeholder>", "<image>"), return_tensors="pt")["input_ids"]
        if single:
            out = dict(self.image_processor(images=images, return_tensors="pt"))
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
            return {"input_ids": ids, **out}
        m = self.model
        tiles = pixels["pixel_values"][: len(images), :1].flatten(0, 1).to(self.dtype)  # (N, C, H, W)
        with torch.no_grad():
            hidden = m.model.vision_tower(tiles, output_hidden_states=True).hidden_states
            feats = m.model.multi_modal_projector(hidden[m.config.vision_feature_layer])  # (N, S*S, D): strategy full
            packed, _ = m.model.pack_image_features(list(feats[:, None]), torch.tensor([[1, 1]] * len(images)),
                                                    image_newline=m.model.image_newline)
            embeds = m.get_input_embeddings()(ids.masked_fill(ids == m.config.image_token_index, 0))
            embeds = embeds.masked_scatter((ids == m.config.image_token_index)[..., None], torch.cat(packed))
        return {"input_ids": ids, "inputs_embeds": embeds}

    def check_pixels(self, image: Image.Image) -> int:
        ours = load_model(self.ckpt)
        assert ours.anyres is not None
        want = self.image_processor(images=[image], return_tensors="pt")
        layout = ours.anyres.layout(image.height, image.width)
        got = ImageProcessor.from_pretrained(self.ckpt).preprocess_tiled(image, layout, ours.anyres.tile)
        assert torch.equal(got, want["pixel_values"][0][: got.shape[0]])
        count = self._count(image.height, image.width)
        assert ours.anyres.num_tokens(layout) == count
        with torch.no_grad():
            theirs = self.model.model.get_image_features(**want, return_dict=True).pooler_output[0]
            mine = ours.encode_tiled(got[None], [layout])[0]
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)  # float32 sums in another order
        return count


class Qwen2VLOracle(Oracle):
    """Qwen2VLProcessor itself needs a video processor (hence torchvision): its <|image_pad|> expansion is done here
    as it does it (grid t*h*w / merge^2 copies per image)."""

    hf_class = Qwen2VLForConditionalGeneration

    def __init__(self, ckpt: Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        super().__init__(ckpt, dtype)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(ckpt)
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt)

    def _pixels(self, images: list[Image.Image], detail: str | None) -> dict[str, torch.Tensor]:
        ip = self.image_processor
        size = dict(ip.size)
        if detail == "low":  # our documented low: at most ~100 visual tokens (the processor's min_pixels allowing)
            factor = ip.patch_size * ip.merge_size
            size["longest_edge"] = min(size["longest_edge"], max(size["shortest_edge"], 100 * factor * factor))
        return dict(ip(images=images, size=size, return_tensors="pt"))

    def inputs(self, question: str, images: list[Image.Image], detail: str | None = None) -> dict[str, Any]:
        text = self.tokenizer.apply_chat_template(messages(len(images), question), add_generation_prompt=True,
                                                  tokenize=False)
        pixels = self._pixels(images, detail) if images else {}
        for grid in pixels.get("image_grid_thw", []):
            text = text.replace("<|image_pad|>", "<|placeholder|>" * int(grid.prod() // 4), 1)
        ids = self.tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt")["input_ids"]
        out: dict[str, Any] = {"input_ids": ids, "mm_token_type_ids": (ids == self.model.config.image_token_id).int()}
        if pixels:
            out.update(pixel_values=pixels["pixel_values"].to(self.dtype), image_grid_thw=pixels["image_grid_thw"])
        return out

    def check_pixels(self, image: Image.Image) -> int:
        ours = load_model(self.ckpt)
        want = self._pixels([image], None)
        cfg = ImageProcessor.from_pretrained(self.ckpt).config
        size = smart_resize(image.height, image.width, cfg.patch_size * cfg.merge_size, cfg.min_pixels,
                            cfg.max_pixels)
        got = ImageProcessor.from_pretrained(self.ckpt).preprocess_patches(image, size)
        assert torch.equal(got, want["pixel_values"])
        grid = tuple(int(x) for x in want["image_grid_thw"][0])
        assert grid == (1, size[0] // cfg.patch_size, size[1] // cfg.patch_size)
        with torch.no_grad():
            theirs = self.model.model.get_image_features(pixel_values=want["pixel_values"],
                                                         image_grid_thw=want["image_grid_thw"],
                                                         return_dict=True).pooler_output[0]
            mine = ours.encode_patches(got, [grid])[0]  # type: ignore[list-item]
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)  # float32 sums in another order
        return int(want["image_grid_thw"][0].prod()) // 4


class Qwen25VLOracle(Qwen2VLOracle):
    """Qwen2.5-VL: Qwen2-VL's processor and prompt, its own model."""

    hf_class = Qwen2_5_VLForConditionalGeneration


class Idefics3Oracle(Oracle):
    """Idefics3 / SmolVLM: transformers' Idefics3Processor (PIL image processor) does everything: the splitting, the
    tile tags and `<image>` slots; `detail` low is its `do_image_splitting=False`."""

    hf_class = Idefics3ForConditionalGeneration

    def __init__(self, ckpt: Path, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(ckpt, dtype)
        self.processor = AutoProcessor.from_pretrained(ckpt)

    def _kwargs(self, detail: str | None) -> dict[str, Any]:
        return {"do_image_splitting": False} if detail == "low" else {}

    def inputs(self, question: str, images: list[Image.Image], detail: str | None = None) -> dict[str, Any]:
        prompt = self.processor.apply_chat_template(messages(len(images), question), add_generation_prompt=True)
        out = dict(self.processor(images=[images] if images else None, text=[prompt], return_tensors="pt",
                                  return_mm_token_type_ids=True, **self._kwargs(detail)))
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def served_ids(self, inputs: dict[str, Any]) -> list[int]:
        """Each image's whole span (its tags and slots, mm_token_type_ids 1) at the image token id, as we serve it."""
        ids = inputs["input_ids"][0].clone()
        ids[inputs["mm_token_type_ids"][0] == 1] = self.model.config.image_token_id
        return list(ids.tolist())

    def answer(self, question: str, images: list[Image.Image], detail: str | None = None,
               max_new_tokens: int = 12) -> tuple[list[int], int]:
        inputs = self.inputs(question, images, detail)
        inputs.pop("mm_token_type_ids")  # ours only (served_ids): Idefics3's model takes none
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, n:].tolist(), n

    def next_logits(self, inputs: dict[str, Any], continuation: list[int]) -> torch.Tensor:
        return super().next_logits({k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, continuation)

    def check_pixels(self, image: Image.Image) -> int:
        ours = load_model(self.ckpt)
        processor = ImageProcessor.from_pretrained(self.ckpt)
        cfg = processor.config
        want = self.processor.image_processor(images=[[image]], return_tensors="pt", return_row_col_info=True)
        split = split_layout(image.height, image.width, tile=cfg.tile_size, longest_edge=cfg.longest_edge,
                             splitting=cfg.do_image_splitting)
        assert (split.rows, split.cols) == (want["rows"][0][0], want["cols"][0][0])
        got = processor.preprocess_split(image, split)
        assert torch.equal(got, want["pixel_values"][0])  # bit for bit
        text = self.processor(images=[[image]], text=["<image>"], return_tensors="pt", return_mm_token_type_ids=True)
        theirs_layout = text["input_ids"][0][text["mm_token_type_ids"][0] == 1]  # the image's span: tags and slots
        planner = Idefics3Planner(ChatTokenizer.from_pretrained(self.ckpt), cfg, ours.config.num_visual_tokens)
        layout = planner.token_layout(split)
        assert layout == tuple(theirs_layout.tolist())
        with torch.no_grad():
            theirs = self.model.model.get_image_features(pixel_values=want["pixel_values"],
                                                         return_dict=True).pooler_output[0]
            mine = ours.encode_split(got, [torch.tensor(layout)])[0]  # (L, D)
            embeds = self.model.get_input_embeddings()(theirs_layout)  # (L, D)
        slots = theirs_layout == self.model.config.image_token_id
        torch.testing.assert_close(mine[slots], theirs, atol=1e-4, rtol=1e-4)  # float32 sums in another order
        assert torch.equal(mine[~slots], embeds[~slots])  # the tags' rows: their token embeddings
        return len(layout)


class Gemma3Oracle(Oracle):
    """Gemma 3: transformers' Gemma3Processor (PIL image processor) expands each <start_of_image> (with pan and scan:
    the image, then its crops, in its words) and marks the image tokens (`token_type_ids`) that attend to each other
    both ways. `detail` as its kwargs: low pan and scan off, high on, auto the checkpoint's do_pan_and_scan; the
    settings the checkpoint's, the processor's defaults where it leaves them null (as `Gemma3Processor` passes
    them)."""

    hf_class = Gemma3ForConditionalGeneration

    def __init__(self, ckpt: Path, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(ckpt, dtype)
        self.processor = AutoProcessor.from_pretrained(ckpt)

    def pan_and_scan(self, detail: str | None) -> dict[str, Any]:
        ip, defaults = self.processor.image_processor, Gemma3Processor.images_kwargs
        keys = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")
        on = detail == "high" or (detail != "low" and bool(ip.do_pan_and_scan))
        return {"do_pan_and_scan": on, **{k: defaults[k] if getattr(ip, k) is None else getattr(ip, k) for k in keys}}

    def inputs(self, question: str, images: list[Image.Image], detail: str | None = None) -> dict[str, Any]:
        prompt = self.processor.apply_chat_template(messages(len(images), question), add_generation_prompt=True)
        # the template writes <bos>: not a second one (as processor.apply_chat_template(tokenize=True) does)
        out = dict(self.processor(images=[images] if images else None, text=[prompt], return_tensors="pt",
                                  add_special_tokens=False, **self.pan_and_scan(detail)))
        assert "token_type_ids" in out  # the bidirectional image spans
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def next_logits(self, inputs: dict[str, Any], continuation: list[int]) -> torch.Tensor:
        ids = torch.cat([inputs["input_ids"], torch.tensor([continuation], dtype=torch.long)], dim=1)
        types = torch.cat([inputs["token_type_ids"], torch.zeros(1, len(continuation), dtype=torch.long)], dim=1)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "token_type_ids", "attention_mask")}
        return self.model(input_ids=ids, token_type_ids=types, **extra).logits[0, -1].float()

    def check_pixels(self, image: Image.Image) -> int:
        """The pan-and-scan views (`detail` high) too: each crop's pixels, the prompt's ids and its image spans (one
        per view, transformers' token_type_ids runs), every view's features."""
        ours = load_model(self.ckpt)
        processor = ImageProcessor.from_pretrained(self.ckpt)
        want = self.processor.image_processor(images=[image], return_tensors="pt")
        got = processor.preprocess_one(image)
        assert torch.equal(got, want["pixel_values"][0])  # bit for bit
        text = self.processor(images=[[image]], text=["<start_of_image>"], return_tensors="pt")
        count = int((text["input_ids"] == self.model.config.image_token_index).sum())
        assert count == ours.config.num_visual_tokens
        preparer = RequestPreparer(ChatTokenizer.from_pretrained(self.ckpt), processor, count)
        plan = preparer.plan("high", size=(image.height, image.width))
        want = self.processor.image_processor(images=[image], return_tensors="pt", **self.pan_and_scan("high"))
        assert int(want["num_crops"][0]) == len(plan.crops) and plan.tokens == count * (1 + len(plan.crops))
        views = processor.preprocess_views(image, plan.crops)
        assert len(views) == len(want["pixel_values"])
        assert all(torch.equal(g, w) for g, w in zip(views, want["pixel_values"], strict=True))  # bit for bit
        inputs = self.inputs("what is it?", [image], "high")
        encoded = preparer.encode(messages(1, "what is it?"), image_tokens=[plan.slots])
        assert encoded.input_ids == inputs["input_ids"][0].tolist()
        types = inputs["token_type_ids"][0].tolist()
        runs = [i for i, t in enumerate(types) if t == 1 and (i == 0 or types[i - 1] != 1)]
        assert [(s.start, s.length) for s in encoded.image_spans] == [(r, count) for r in runs]
        with torch.no_grad():
            theirs = self.model.model.get_image_features(pixel_values=want["pixel_values"],
                                                         return_dict=True).pooler_output  # (V, N_vis, D)
            mine = ours.encode_images(torch.stack(views))  # (V, N_vis, D)
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)  # float32 sums in another order
        return count
