"""A decoder-only Transformer of the Llama family: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Qwen2 adds a bias to the q/k/v projections; Mistral adds a sliding window. The forward takes token ids or input
embeddings, explicit positions (one per token, so sequences of different lengths and offsets share a batch) and,
optionally, a paged batch (model/attention.py) whose keys and values live in the paged KV cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext, DenseAttention, PagedBatch
from .config import RopeConfig, TextConfig
from .step_attention import StepAttention


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the weights' dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)  # the same products, fewer ops
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x / rms(x), in float32
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) for the configured rope type, in float32."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim  # on the CPU, never meta
    inv_freq = 1.0 / (rope.theta**exps)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings or 8192
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables, looked up by position: no trigonometry in the decode step."""

    cos: torch.Tensor  # (P, Dh), a non-persistent buffer
    sin: torch.Tensor  # (P, Dh), a non-persistent buffer

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.rope, self.head_dim, self.max_positions = rope, head_dim, max_positions
        cos, sin = self.tables("cpu")  # computed here, on the CPU even when the model is built on the meta device
        self.register_buffer("cos", cos, persistent=False)  # (P, Dh)
        self.register_buffer("sin", sin, persistent=False)  # (P, Dh)

    def tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin tables (P, Dh), computed on `device` in float32."""
        inv_freq = rope_inv_freq(self.rope, self.head_dim).to(device)  # (Dh/2,)
        freqs = torch.arange(self.max_positions, device=device).float()[:, None] * inv_freq  # (P, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, Dh)
        return emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # (B, T, D) each

    def sectioned(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE (Qwen2-VL): positions (3, B, T) of (time, row, column); each share of the rotary half takes its
        angles from its own axis (`mrope_section`), the second half as the first. A token whose three positions
        are equal gets exactly `forward`'s angles."""
        section = self.rope.mrope_section
        assert section is not None
        axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(section)])  # (Dh/2,)
        axis = torch.cat([axis, axis]).to(positions.device)  # (Dh,)
        index = axis.view(1, 1, 1, -1).expand(1, *positions.shape[1:], axis.numel())  # (1, B, T, Dh)
        cos = self.cos[positions].gather(0, index)[0]  # (B, T, Dh)
        sin = self.sin[positions].gather(0, index)[0]  # (B, T, Dh)
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by per-token angles cos/sin (B, T, D)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions; what the queries see is the context's business."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.window = config.sliding_window  # keys further back than this are not seen (None: all)
        d = config.hidden_size
        # q, k and v in one matmul (checkpoints keep them apart: model/weights.py merges them on load, splits on save)
        self.qkv_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (B, T, Dh)
        sin: torch.Tensor,  # (B, T, Dh)
        attn: AttentionContext | StepAttention,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, h_kv = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(b, t, h + 2 * h_kv, self.head_dim)  # (B, T, H + 2 H_kv, Dh)
        qk = apply_rope(qkv[:, :, : h + h_kv], cos, sin)  # (B, T, H + H_kv, Dh): one rotation for both
        q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + h_kv :]
        out = attn.attend(self.layer_idx, q, k, v, window=self.window)  # (B, T, H, Dh)
        return self.o_proj(out.reshape(b, t, h * self.head_dim))  # (B, T, D)


class SwiGLU(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(d, 2 * h, bias=config.mlp_bias)  # gate and up in one matmul (as q/k/v)
        self.down_proj = nn.Linear(h, d, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionContext | StepAttention) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)  # (B, T, D)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_context(positions: torch.Tensor | None, attention_mask: torch.Tensor | None, mask: torch.Tensor | None,
                      paged: AttentionContext | StepAttention | None) -> AttentionContext | StepAttention:
    """What a forward's queries attend through: the paged step it was given (which needs explicit positions), or a
    dense causal context over its own tokens."""
    if paged is not None:
        if positions is None:
            raise ValueError("a paged forward needs explicit positions")
        return paged
    return DenseAttention(positions, attention_mask.bool() if attention_mask is not None else None, mask)


class TextModel(nn.Module):
    """The causal LM: token embeddings, decoder layers, final norm and the (optionally tied) output head."""

    def __init__(self, config: TextConfig, *, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, max_positions or config.max_position_embeddings)

    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers, typed (an `nn.ModuleList` yields plain Modules)."""
        return [layer for layer in self.layers if isinstance(layer, DecoderLayer)]

    def attention_windows(self) -> set[int | None]:
        """The layers' sliding windows (None: the layer attends to every earlier key)."""
        return {layer.self_attn.window for layer in self.decoder_layers()}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        *,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, D)
        positions: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 for real tokens, 0 for padding
        mask: torch.Tensor | None = None,  # (B, 1, T, T) bool, True = attend: replaces the causal mask
        paged: PagedBatch | StepAttention | None = None,
        logits: bool = True,
        rope_positions: torch.Tensor | None = None,  # (3, B, T) M-RoPE positions, where they are not all equal
    ) -> torch.Tensor:
        """Return logits (B, T, V), or the final hidden states (B, T, D) with `logits=False`.

        Without `paged`, the batch attends within itself: causally by `positions` (default 0..T-1), skipping padding
        (`attention_mask`), or under an explicit `mask` (training's packed rows). With `paged` (a serving step: B = 1,
        the step's tokens side by side), keys and values go to the paged cache and each token attends to its own
        sequence's cached keys; `positions` then come from the caller, one per token. A compiled serving forward
        gets a `StepAttention` instead, which reaches the step's `PagedBatch` through an opaque op.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        b, t, _ = x.shape
        attn = attention_context(positions, attention_mask, mask, paged)
        if positions is None:
            positions = torch.arange(t, device=x.device)[None, :].expand(b, t)  # (B, T)
        if rope_positions is not None:
            cos, sin = self.rotary.sectioned(rope_positions, x.dtype)  # (B, T, Dh) each
        else:
            cos, sin = self.rotary(positions, x.dtype)  # (B, T, Dh) each
        for layer in self.layers:
            x = layer(x, cos, sin, attn)  # (B, T, D)
        x = self.norm(x)  # (B, T, D)
        return self.lm_head(x) if logits else x
