"""Gemma 3's language model, beside the Llama family's (model/text.py), sharing its attention contexts and rotary
tables: RMSNorms that scale by (1 + weight) and cast after the product, embeddings scaled by sqrt(hidden), q/k
norms per head, a norm before and after both the attention and the MLP, a tanh-GELU gated MLP, and layers of two kinds
(`layer_types`): `sliding_attention` layers see the last `sliding_window` keys with the local rotary base,
`full_attention` layers all keys with the global one (linear scaling for the long-context checkpoints).

The forward has model/text.py's `TextModel` signature, so the engine's runner drives both the same way (the paged
batch, its compiled decode step); which keys a query sees is the attention context's business (the window per
layer, the image spans made bidirectional by the runner).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext, PagedBatch
from .config import TextConfig
from .step_attention import StepAttention
from .text import RMSNorm, RotaryEmbedding, TextModel, apply_rope, attention_context


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight), all in float32, cast back to x's dtype at the end (Gemma's order)."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(hidden_size), the scale rounded to the weights' dtype first (as transformers)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.scale = embedding_dim**0.5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.window = config.sliding_window if self.sliding else None
        scalar = config.query_pre_attn_scalar or config.head_dim
        self.q_scale = (config.head_dim / scalar) ** 0.5  # folded into q where it is not SDPA's 1/sqrt(head_dim)
        d = config.hidden_size
        self.qkv_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=config.o_bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionContext | StepAttention) -> torch.Tensor:  # (B, T, D), (B, T, Dh) x 2
        b, t, _ = x.shape
        h, h_kv = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(b, t, h + 2 * h_kv, self.head_dim)  # (B, T, H + 2 H_kv, Dh)
        q = apply_rope(self.q_norm(qkv[:, :, :h]), cos, sin)  # (B, T, H, Dh)
        k = apply_rope(self.k_norm(qkv[:, :, h : h + h_kv]), cos, sin)  # (B, T, H_kv, Dh)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        out = attn.attend(self.layer_idx, q, k, qkv[:, :, h + h_kv :], window=self.window)  # (B, T, H, Dh)
        projected: torch.Tensor = self.o_proj(out.reshape(b, t, h * self.head_dim))  # (B, T, D)
        return projected


class GeluGLU(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(d, 2 * f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each
        out: torch.Tensor = self.down_proj(F.gelu(gate, approximate="tanh") * up)  # (B, T, D)
        return out


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer_idx)
        self.mlp = GeluGLU(config)
        self.input_layernorm = GemmaRMSNorm(d, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps=eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps=eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionContext | StepAttention) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attn))  # (B, T, D)
        out: torch.Tensor = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return out


class Gemma3TextModel(TextModel):
    """Gemma 3's causal LM with TextModel's interface (`rotary` is the global layers' table, `rotary_local` the
    sliding layers')."""

    def __init__(self, config: TextConfig, *, max_positions: int | None = None) -> None:
        nn.Module.__init__(self)
        if config.rope_local is None or len(config.layer_types) != config.num_hidden_layers:
            raise ValueError("a gemma3_text config needs layer_types and a local rope")
        self.config = config
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n = max_positions or config.max_position_embeddings
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, n)
        self.rotary_local = RotaryEmbedding(config.rope_local, config.head_dim, n)

    def gemma_layers(self) -> list[Gemma3DecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, Gemma3DecoderLayer)]

    def attention_windows(self) -> set[int | None]:
        return {layer.self_attn.window for layer in self.gemma_layers()}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        *,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, D)
        positions: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
        mask: torch.Tensor | None = None,  # (B, 1, T, T)
        paged: PagedBatch | StepAttention | None = None,
        logits: bool = True,
        rope_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """TextModel.forward's contract (no M-RoPE: `rope_positions` must be None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if rope_positions is not None:
            raise ValueError("Gemma 3 has no M-RoPE positions")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        b, t, _ = x.shape
        attn = attention_context(positions, attention_mask, mask, paged)
        if positions is None:
            positions = torch.arange(t, device=x.device)[None, :].expand(b, t)  # (B, T)
        full = self.rotary(positions, x.dtype)  # (B, T, Dh) x 2
        local = self.rotary_local(positions, x.dtype)  # (B, T, Dh) x 2
        for layer in self.gemma_layers():
            cos, sin = local if layer.self_attn.sliding else full
            x = layer(x, cos, sin, attn)  # (B, T, D)
        x = self.norm(x)  # (B, T, D)
        out: torch.Tensor = self.lm_head(x) if logits else x  # (B, T, V) or (B, T, D)
        return out
