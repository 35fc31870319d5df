"""A step's tensors and the model call: encoder for the images the step needs, one LM forward over every scheduled
token (decodes and prefill chunks side by side on one flat axis), and sampling of the sequences that reach their end.

The runner turns the scheduler's plan into: token ids (placeholders embed as 0, then the visual tokens are copied
into their rows), positions (one per token; families with other rotary schemes supply their own), flat cache slots,
the decodes' block tables and lengths, and one `Segment` per multi-token chunk. Only the last token of a sequence
that reaches its end goes through the output head. Reading the sampled ids back is the step's one host sync.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmserve.model.anyres import Layout
from vlmserve.model.attention import PagedBatch, Segment
from vlmserve.model.kernels import paged_decode_op, step_ops
from vlmserve.model.kv_cache import PagedKVCache
from vlmserve.model.mrope import GridSpan
from vlmserve.model.mrope import positions as mrope_positions
from vlmserve.model.qwen2_vision import Grid
from vlmserve.model.sampler import SamplerState, token_logprobs
from vlmserve.model.serving_weights import use_native_ops
from vlmserve.model.step_attention import StepAttention, stepping, stepping_native
from vlmserve.model.vlm import VisionLanguageModel

from .observer import EngineCounters, Observer
from .requests import BadRequest, EngineError, InternalError, TokenLogprob
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .structured import StructuredOutputs
from .vision_cache import VisionCache

log = logging.getLogger(__name__)
_pool_ids = itertools.count()  # the KV pools each runner registers with the C++ step ops


@dataclass
class StepOutput:
    sampled: list[tuple[Sequence, int, TokenLogprob | None]] = field(default_factory=list)  # (seq, new token, lp)
    failed: list[tuple[Sequence, EngineError]] = field(default_factory=list)  # (sequence, why): failed alone
    computed: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens now in the cache)
    seconds: float = 0.0  # the forward and the sampling
    prefill: bool = False  # whether the step computed any multi-token chunk


def _consecutive(table: list[int]) -> bool:
    """Whether the blocks follow one another in the pool (so that the keys are one slice of it)."""
    return table == list(range(table[0], table[0] + len(table)))


class ModelRunner:
    def __init__(self, model: VisionLanguageModel, cache: PagedKVCache, vision_cache: VisionCache, *,
                 max_rows: int, max_images_per_encode: int, counters: EngineCounters, observer: Observer,
                 compile_steps: bool = False, structured: StructuredOutputs | None = None) -> None:
        self.model, self.cache, self.vision_cache = model, cache, vision_cache
        lm = model.language_model
        param = next(lm.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.sampler = SamplerState(max_rows, lm.lm_head.out_features, self.device)
        self.windows = lm.attention_windows()
        self.bidirectional_images = bool(getattr(model, "bidirectional_images", False))
        self.max_images_per_encode = max_images_per_encode
        self.counters, self.observer = counters, observer
        # The steps through torch.compile: the layers are traced, the attention is one opaque op per layer
        # (model/step_attention.py), so a graph's one varying size is the step's number of tokens: one graph for a
        # single decode, one for two and more, one for the steps with prefill chunks (their norms, rotary, SwiGLU
        # and residual adds fused: ~8 % off the prefill steps of the 16-stream benchmark load here, 5.4-5.7 against
        # 6.1-6.2 s in three paired rounds). Eager if compiling fails (no C++ compiler, ...), each kind on its own.
        # On a CPU the graph's wrapper is C++ too (inductor's cpp_wrapper): the kernels are called without Python
        # between them, ~8 % off a bf16 decode step at batch 1 here (8.8-9.8 against 9.5-10.7 ms per token).
        options: dict[str, str | int | bool | Callable[..., Any]] | None = (
            {"cpp_wrapper": True} if self.device.type == "cpu" else None)
        self._compiled = torch.compile(lm.forward, options=options) if compile_steps else None
        # On a CPU the compiled step calls C++ ops for its matmuls and attention (model/csrc/step_ops.cpp) where
        # they build: no Python, and no wait for the GIL, between its kernels.
        self._native: Any | None = None
        if compile_steps and self.device.type == "cpu" and (ops := step_ops()) is not None:
            use_native_ops(lm, ops)
            self._pools = next(_pool_ids)
            ops.register_pools(self._pools, cache.k, cache.v)
            weakref.finalize(self, ops.release_pools, self._pools).atexit = False
            self._native = ops
        self._step_attention = StepAttention(native=self._native is not None)
        self._prefill_attention = StepAttention()  # steps with chunks: the Python op (the C++ one only decodes)
        self._compile_prefill = compile_steps
        # The vision tower (LLaVA's: one image size) compiled for two and more images at once (a dynamic batch; one
        # image stays eager rather than compile a graph of its own): its layer norms, quick GELU and residual adds
        # fused, ~0.2 s less of the 16-stream load's ~1.1 s of encoding here.
        self._compiled_encode = (torch.compile(model.encode_images, options=options)
                                 if compile_steps and model.config.spec.compile_encoder else None)
        self.mrope = lm.rotary.rope.mrope_section is not None  # Qwen2-VL: (t, row, column) positions for images
        self.merge = model.qwen2_vision.spatial_merge_size if model.qwen2_vision is not None else 1
        if self.device.type == "cpu":
            paged_decode_op()  # built (once per machine, ~10 s) or found now, not in the first decode step
        self.structured = structured

    def assign(self, seq: Sequence) -> None:
        """Load a newly admitted sequence's sampling settings into its row."""
        seq.seed = self.sampler.assign(seq.row, seq.req.sampling, seq.req.prompt_ids)

    # ------------------------------------------------------------------------------------------------- execute
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        out = StepOutput()
        failed = self._resolve_images(batch, out)
        items = [(s, n) for s, n in batch.items if id(s) not in failed]
        if not items:
            return out
        t0 = time.perf_counter()
        try:
            sampled = self._forward(items)
        except Exception as e:
            log.exception("model step failed for %d sequences", len(items))
            out.failed += [(s, InternalError(f"the model step failed: {type(e).__name__}")) for s, _ in items]
            return out
        refused: set[int] = set()
        for seq, token, _ in sampled:  # a constrained sequence's matcher follows its tokens
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                why = seq.matcher.get_error() or ""
                log.error("request %s: the grammar refused token %d: %s", seq.request_id, token, why)
                out.failed.append((seq, BadRequest("the output grammar grew too complex to follow") if "TooComplex"
                                   in why else InternalError("the output grammar refused a sampled token")))
                refused.add(id(seq))
        out.computed = [(s, n) for s, n in items if id(s) not in refused]
        out.sampled = [x for x in sampled if id(x[0]) not in refused]
        n_decodes = sum(1 for _, n in items if n == 1)
        self.counters.steps += 1
        self.counters.decode_tokens += n_decodes
        self.counters.decode_forwards += n_decodes > 0
        self.counters.prefill_forwards += n_decodes < len(items)
        self.counters.max_batch_size = max(self.counters.max_batch_size, len(items))
        out.seconds, out.prefill = time.perf_counter() - t0, n_decodes < len(items)
        return out

    def _forward(self, items: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        bs = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        image_rows: list[int] = []
        image_parts: list[torch.Tensor] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        segments: list[tuple[int, int, int, list[int], tuple[tuple[int, int], ...]]] = []
        last: list[int] = []  # flat index of the last token of each sequence that samples
        samplers: list[Sequence] = []
        rope_rows: list[list[int]] | None = None  # M-RoPE: (3, N) once a token of the step is an image's
        for seq, n in items:
            start, lo = len(ids), seq.num_computed
            hi = lo + n
            ids += seq.token_ids[lo:hi]
            if self.mrope:
                flat, axes = mrope_positions(lo, hi, self._rope_spans(seq))
                if axes is not None and rope_rows is None:
                    rope_rows = [list(positions), list(positions), list(positions)]
                if rope_rows is not None:
                    for r, mine in zip(rope_rows, axes or (flat, flat, flat), strict=True):
                        r += mine
                positions += flat
            else:
                positions += range(lo, hi)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(lo, hi)]
            for span in seq.spans_in(lo, hi):
                a, b = max(lo, span.start), min(hi, span.end)
                image_rows += range(start + a - lo, start + b - lo)
                image_parts.append(seq.visual[span.index][a - span.start : b - span.start])  # (b - a, D)
            n_blocks = -(-hi // bs)
            if n == 1:
                decode_tables.append(table[:n_blocks])
                decode_lens.append(hi)
            else:
                spans = tuple((s.start, s.end) for s in seq.spans) if self.bidirectional_images else ()
                segments.append((start, n, hi, table[:n_blocks], spans))
            if hi == seq.num_tokens:
                last.append(start + n - 1)
                samplers.append(seq)
        lm = self.model.language_model
        ids_t = self._tensor(ids)  # (N,)
        embeds = self.model.embed_tokens(ids_t[None])[0]  # (N, D)
        if image_rows:
            visual = torch.cat(image_parts).to(embeds.dtype)  # (N_img_rows, D)
            embeds = embeds.index_copy(0, self._tensor(image_rows), visual)  # (N, D)
        paged = PagedBatch(self.cache, self._tensor(slots), num_decodes=len(decode_lens))
        if decode_lens:
            width = max(len(t) for t in decode_tables)
            paged.decode_tables = self._tensor([t + [0] * (width - len(t)) for t in decode_tables])  # (B_d, nb)
            paged.decode_lens = self._tensor(decode_lens)  # (B_d,)
            paged.decode_max_len = max(decode_lens)
            if len(decode_tables) == 1 and _consecutive(decode_tables[0]):
                paged.decode_run = decode_tables[0][0]
            equal = all(n == paged.decode_max_len for n in decode_lens)
            paged.decode_masks = PagedBatch.decode_masks_for(paged.decode_lens, paged.decode_max_len, self.windows,
                                                             equal=equal)
        paged.segments = [Segment(s, n, c, self._tensor(t), sp) for s, n, c, t, sp in segments]
        pos_t = self._tensor(positions)[None]  # (1, N)
        rope_t = self._tensor(rope_rows)[:, None] if rope_rows is not None else None  # (3, 1, N)
        hidden = None
        if self._compiled is not None and rope_t is None and (self._compile_prefill or not segments):
            hidden = self._compiled_forward(embeds[None], pos_t, paged)  # (N, D), or None if compiling failed
            self.counters.compiled_prefill_forwards += bool(segments) and hidden is not None
        if hidden is None:
            hidden = lm(inputs_embeds=embeds[None], positions=pos_t, paged=paged, logits=False,
                        rope_positions=rope_t)[0]  # (N, D)
        if not samplers:
            return []
        logits = lm.lm_head(hidden[self._tensor(last)])  # (S, V)
        rows = self._tensor([s.row for s in samplers])  # (S,)
        matchers = [s.matcher for s in samplers]
        constrained = logits
        if self.structured is not None and any(m is not None for m in matchers):
            constrained = self.structured.mask(logits, matchers)  # (S, V) what each grammar forbids at -inf
        tokens = self.sampler.sample(constrained, rows, [s.num_generated for s in samplers],
                                     [s.req.sampling for s in samplers])
        wanted = [s.req.logprobs for s in samplers]
        logprobs: list[TokenLogprob | None] = [None] * len(samplers)
        if any(k is not None for k in wanted):
            for i, (chosen, top) in token_logprobs(logits, tokens, wanted).items():
                logprobs[i] = TokenLogprob(tokens[i], chosen, tuple(top))
        return list(zip(samplers, tokens, logprobs, strict=True))

    def _rope_spans(self, seq: Sequence) -> list[GridSpan]:
        """The sequence's images as merged grids, for its M-RoPE positions (computed once)."""
        if seq.rope_spans is None:
            spans = []
            for span in seq.spans:
                grid = seq.req.images[span.index].grid
                if grid is None:
                    raise BadRequest(f"image {span.index} has no patch grid, which this model's positions need")
                spans.append(GridSpan(span.start, grid[1] // self.merge, grid[2] // self.merge))
            seq.rope_spans = spans
        return seq.rope_spans

    def _compiled_forward(self, embeds: torch.Tensor, positions: torch.Tensor, paged: PagedBatch
                          ) -> torch.Tensor | None:
        """The step's forward through the compiled graphs: hidden states (N, D), or None (and that kind of step
        eager from now on) if compiling fails."""
        assert self._compiled is not None
        prefill = bool(paged.segments)
        if embeds.shape[1] > 1:  # one graph for any number of tokens (a single decode is a graph of its own)
            torch._dynamo.maybe_mark_dynamic(embeds, 1)
            torch._dynamo.maybe_mark_dynamic(positions, 1)
        native = self._native is not None and not prefill
        try:
            with stepping_native(self._native, self._pools, paged) if native else stepping(paged):
                attention = self._prefill_attention if prefill else self._step_attention
                return self._compiled(inputs_embeds=embeds, positions=positions, paged=attention,
                                      logits=False)[0]  # (N, D)
        except Exception as e:
            kind = "prefill" if prefill else "decode"
            log.warning("torch.compile of the %s step failed (%s: %s); running it eagerly", kind, type(e).__name__, e)
            if prefill:
                self._compile_prefill = False
            else:
                self._compiled = None
            return None

    # -------------------------------------------------------------------------------------------------- images
    def _resolve_images(self, batch: ScheduledBatch, out: StepOutput) -> set[int]:
        """Make sure every image span the step computes has its visual tokens in `seq.visual`; return the ids of
        sequences that failed (an image that could not be encoded fails its request alone)."""
        t0 = time.perf_counter()
        todo: dict[tuple[str, str], list[tuple[Sequence, int]]] = {}
        pixels: dict[tuple[str, str], torch.Tensor] = {}
        layouts: dict[tuple[str, str], Layout] = {}  # tiled (llava_next) images: size and grid
        grids: dict[tuple[str, str], Grid] = {}  # qwen2_vl images: their patch grids
        token_layouts: dict[tuple[str, str], tuple[int, ...]] = {}  # idefics3 images: their spans' ids
        frames: dict[tuple[str, str], int] = {}  # audio clips: their valid mel frames
        hits = audio_hits = 0  # audio_hits: of them, clips' (kept out of the vision metrics)
        for seq, n in batch.items:
            for span in seq.spans_in(seq.num_computed, seq.num_computed + n):
                if span.index in seq.visual:
                    continue
                img = seq.req.images[span.index]
                key = (seq.req.cache_salt, img.key)
                tokens = img.visual_tokens if img.visual_tokens is not None else self.vision_cache.get(key)
                if tokens is None and key in todo:
                    hits += 1  # the same image twice in this step: encoded once
                    audio_hits += img.is_audio
                if tokens is not None:
                    seq.visual[span.index] = tokens
                    hits += 1
                    audio_hits += img.is_audio
                elif img.pixel_values is not None:
                    todo.setdefault(key, []).append((seq, span.index))
                    pixels[key] = img.pixel_values
                    if img.layout is not None:
                        layouts[key] = img.layout
                    if img.grid is not None:
                        grids[key] = img.grid
                    if img.token_layout is not None:
                        token_layouts[key] = img.token_layout
                    if img.audio_frames is not None:
                        frames[key] = img.audio_frames
                else:
                    todo.setdefault(key, []).append((seq, span.index))
        encoded: dict[tuple[str, str], torch.Tensor] = {}
        by_shape: dict[tuple[int | str, ...], list[tuple[str, str]]] = {}
        for key in pixels:  # qwen2_vl's tower (idefics3's: tiles) takes images of any size side by side: one group;
            # audio clips: one group
            shape: tuple[int | str, ...] = (("audio",) if key in frames else () if key in grids or key in token_layouts
                                            else pixels[key].shape)
            by_shape.setdefault(shape, []).append(key)
        audio_seconds = 0.0
        for group, keys in by_shape.items():
            step = self.max_images_per_encode
            t_group = time.perf_counter()
            for i in range(0, len(keys), step):
                encoded.update(self._encode([*keys[i : i + step]], pixels, layouts, grids, token_layouts, frames))
            if group == ("audio",):
                audio_seconds = time.perf_counter() - t_group
        failed: set[int] = set()
        for key, users in todo.items():
            tokens = encoded.get(key)
            for seq, index in users:
                if tokens is None or tokens.shape[0] != seq.spans[index].length:
                    if id(seq) not in failed:
                        failed.add(id(seq))
                        why = "an image of this request could not be encoded" if tokens is None else (
                            f"image {index} gave {tokens.shape[0]} visual tokens for {seq.spans[index].length} slots")
                        out.failed.append((seq, BadRequest(why)))
                else:
                    seq.visual[index] = tokens
        clips = len(frames)  # audio cache hits and misses are the HTTP side's (server/audio_inputs.py)
        images, hits = len(pixels) - clips, hits - audio_hits
        self.counters.vision_cache_hits += hits
        self.counters.vision_cache_misses += images
        if images or hits:
            self.observer.vision(time.perf_counter() - t0 - audio_seconds, images, hits, images)
        if clips:
            self.observer.audio(audio_seconds, clips)
        return failed

    def _encode(self, keys: Seq[tuple[str, str]], pixels: dict[tuple[str, str], torch.Tensor],
                layouts: dict[tuple[str, str], Layout], grids: dict[tuple[str, str], Grid],
                token_layouts: dict[tuple[str, str], tuple[int, ...]], frames: dict[tuple[str, str], int]
                ) -> dict[tuple[str, str], torch.Tensor]:
        """Encode images of one pixel shape (qwen2_vl, idefics3: of any; audio clips: their features) in one call;
        on failure retry one by one so that only the bad image is lost. The family's spec names the entry point."""
        try:
            moved = [pixels[k].to(self.device, self.dtype, non_blocking=True) for k in keys]
            tokens: Seq[torch.Tensor]
            encoder = self.model.config.spec.encoder
            if keys[0] in frames:  # audio: (N, M, F) features -> each clip's (n_i, D)
                tokens = self.model.encode_audio(torch.stack(moved), [frames[k] for k in keys])
            elif encoder == "patches":  # qwen2_vl: patches side by side (sum N_i, C*T*P*P) -> each (n_i, D)
                tokens = self.model.encode_patches(torch.cat(moved), [grids[k] for k in keys])
            elif encoder == "split":  # idefics3: tiles (sum T_i, C, H, W) -> each image's span (L_i, D)
                tokens = self.model.encode_split(torch.cat(moved), [self._tensor(token_layouts[k]) for k in keys])
            elif encoder == "tiled":  # llava_next / onevision: (N, T, C, H, W) tiles -> each image's (n_i, D)
                tokens = self.model.encode_tiled(torch.stack(moved), [layouts[k] for k in keys])
            else:
                tokens = list(self._encode_images(torch.stack(moved)))  # N x (N_vis, D)
        except Exception:
            if len(keys) == 1:
                log.exception("encoding image %s failed", keys[0][1][:12])
                return {}
            out: dict[tuple[str, str], torch.Tensor] = {}
            for k in keys:
                out.update(self._encode([k], pixels, layouts, grids, token_layouts, frames))
            return out
        self.counters.encoder_calls += 1
        self.counters.images_encoded += len(keys)
        out = {}
        for k, t in zip(keys, tokens, strict=True):
            t = t.clone()  # a clone: a slice would pin the whole batch's memory in the cache
            self.vision_cache.put(k, t)
            out[k] = t
        return out

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, N_vis, D): through the compiled tower from two images on (eager if it fails)."""
        if self._compiled_encode is not None and pixels.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(pixels, 0)
            try:
                out: torch.Tensor = self._compiled_encode(pixels)
                return out
            except Exception as e:
                log.warning("torch.compile of the vision tower failed (%s: %s); encoding eagerly", type(e).__name__,
                            e)
                self._compiled_encode = None
        return self.model.encode_images(pixels)

    def _tensor(self, values: Seq[int] | Seq[Seq[int]]) -> torch.Tensor:
        """A small int64 tensor on the device, copied without blocking the host on CUDA."""
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)
