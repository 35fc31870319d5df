"""A decoder-only Transformer of the Llama family: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Qwen2 adds a bias to the q/k/v projections; Mistral adds a sliding window. The forward takes token ids or input
embeddings, explicit positions (one per token, so sequences of different lengths and offsets share a batch) and,
optionally, a preallocated `KVCache` addressed by slot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import RopeConfig, TextConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the weights' dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x / rms(x), in float32, one kernel
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) for the configured rope type, in float32."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
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

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.rope, self.head_dim, self.max_positions = rope, head_dim, max_positions
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the tables on the buffers' device, e.g. after building on the meta device."""
        device = self.cos.device
        inv_freq = rope_inv_freq(self.rope, self.head_dim).to(device)  # (D/2,)
        freqs = torch.arange(self.max_positions, device=device).float()[:, None] * inv_freq  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # (B, T, D) each


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by per-token angles cos/sin (B, T, D)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and an optional slot-addressed KV cache."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=config.o_bias)
        self.qkv_proj: nn.Linear | None = None  # q, k, v in one matmul once fused (serving_weights.py)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (B, T, Dh)
        sin: torch.Tensor,  # (B, T, Dh)
        mask: torch.Tensor | None,  # (B, 1, T, S) bool, True = attend; None = plain causal over T
        cache: KVCache | None,
        positions: torch.Tensor,  # (B, T)
        slots: torch.Tensor | None,  # (B,)
        kv_len: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, h_kv = self.n_heads, self.n_kv
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(b, t, h + 2 * h_kv, self.head_dim)  # (B, T, H + 2 H_kv, Dh)
            qk = apply_rope(qkv[:, :, : h + h_kv], cos, sin)  # (B, T, H + H_kv, Dh): one rotation for both
            q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + h_kv :]
        else:
            q = self.q_proj(x).view(b, t, h, self.head_dim)  # (B, T, H, Dh)
            k = self.k_proj(x).view(b, t, h_kv, self.head_dim)  # (B, T, H_kv, Dh)
            v = self.v_proj(x).view(b, t, h_kv, self.head_dim)  # (B, T, H_kv, Dh)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, positions, slots, kv_len)  # (B, S, H_kv, Dh)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T|S, Dh)
        if t == 1 and x.device.type == "cpu" and x.dtype != torch.float32:
            # PyTorch's CPU attention kernel is ~5x slower for a one-token query in bf16 than in fp32 (2.0 vs 0.4 ms
            # at 16 x 111 keys): a decode step attends in fp32, which is also the more exact.
            q, k, v = q.float(), k.float(), v.float()
        gqa = self.n_kv != self.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)  # (B, H, T, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, Dh)
        out = out.to(x.dtype).transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H * Dh)
        return self.o_proj(out)  # (B, T, D)


def attention_mask_for(
    positions: torch.Tensor,  # (B, T) query positions
    key_positions: torch.Tensor,  # (B, S)
    key_valid: torch.Tensor | None = None,  # (B, S) bool
    window: int | None = None,
) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: a query sees keys at or before its own position (and inside the window)."""
    mask = key_positions[:, None, :] <= positions[:, :, None]  # (B, T, S)
    if window is not None:
        mask &= key_positions[:, None, :] > positions[:, :, None] - window
    if key_valid is not None:
        mask &= key_valid[:, None, :]
        if mask.shape[1] == mask.shape[2]:
            # A padding query sees at least itself, so no row is fully masked (which would give NaN that later
            # layers' values would carry); real queries already see themselves.
            mask |= torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    return mask[:, None]  # (B, 1, T, S)


class SwiGLU(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, h, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, h, bias=config.mlp_bias)
        self.down_proj = nn.Linear(h, d, bias=config.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None  # gate and up in one matmul, once fused for serving

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, *attn_args: object) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        *,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, D)
        positions: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 for real tokens; cache-less path only
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,  # (B,)
        kv_len: int | None = None,
        logits: bool = True,
        unmasked: bool = False,
    ) -> torch.Tensor:
        """Return logits (B, T, V), or the final hidden states (B, T, D) with `logits=False`.

        With a cache, `kv_len` bounds the keys attended to (the longest sequence in the batch after this step);
        it is a host-side integer so that the step needs no device sync. `unmasked` says that every query may see
        all `kv_len` keys (one token per sequence, all at position kv_len - 1: a decode step of equal lengths), so
        no mask is built (a sliding window still gets one).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        b, t, _ = x.shape
        window = self.config.sliding_window
        mask: torch.Tensor | None = None
        if cache is not None:
            if positions is None:
                raise ValueError("a cached forward needs explicit positions")
            kv_len = int(positions.max()) + 1 if kv_len is None else kv_len
            if not (unmasked and t == 1 and (window is None or kv_len <= window)):
                key_pos = torch.arange(kv_len, device=x.device)[None, :].expand(b, kv_len)  # (B, S)
                mask = attention_mask_for(positions, key_pos, None, window)
        elif positions is not None or attention_mask is not None or window is not None:
            if positions is None:
                positions = torch.arange(t, device=x.device)[None, :].expand(b, t)  # (B, T)
            valid = attention_mask.bool() if attention_mask is not None else None
            mask = attention_mask_for(positions, positions, valid, window)
        if positions is None:
            positions = torch.arange(t, device=x.device)[None, :].expand(b, t)  # (B, T)
        cos, sin = self.rotary(positions, x.dtype)  # (B, T, Dh) each
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, positions, slots, kv_len or t)
        x = self.norm(x)  # (B, T, D)
        return self.lm_head(x) if logits else x
