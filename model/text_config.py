"""Typed configuration of the language model: the Llama family (Llama, Mistral, Qwen2; Qwen2-VL's M-RoPE sections),
read from and written to transformers' `text_config` layout. model/config.py composes it with the vision side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_TEXT_TYPES = ("llama", "qwen2", "mistral", "qwen2_vl_text", "qwen2_5_vl_text", "gemma3_text")
_QWEN2_TYPES = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")  # q/k/v bias, no o bias
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A checkpoint configuration this project cannot serve; the message says what is supported."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters: `default`, `linear` (position interpolation) or `llama3` frequency scaling."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    mrope_section: tuple[int, ...] | None = None  # Qwen2-VL's M-RoPE: the (t, h, w) shares of the rotary half

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> RopeConfig:
        """Read transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling` pair."""
        params: dict[str, Any] = dict(d.get("rope_parameters") or {})
        if not params:
            params = dict(d.get("rope_scaling") or {})
            params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = params["rope_type"] if "rope_type" in params else params.get("type", "default")
        if rope_type == "mrope":  # Qwen2-VL's older configs: default frequencies, sectioned by mrope_section
            rope_type = "default"
        section = params.get("mrope_section")
        return cls(
            rope_type=rope_type,
            theta=float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
            mrope_section=tuple(int(x) for x in section) if section else None,
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.mrope_section is not None:
            out["mrope_section"] = list(self.mrope_section)
        if self.rope_type in ("linear", "llama3"):
            out["factor"] = self.factor
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclass(frozen=True)
class TextConfig:
    """A decoder-only Transformer of the Llama family (Llama, Mistral; Qwen2 adds q/k/v bias)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # gemma3_text (model/gemma3_text.py): each layer's kind, the softmax scale's scalar, the sliding layers' rope
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float | None = None
    rope_local: RopeConfig | None = None

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.model_type == "gemma3_text":
            if self.hidden_act != "gelu_pytorch_tanh" or self.rope_local is None:
                raise ConfigError("gemma3_text needs hidden_activation gelu_pytorch_tanh and a local rope")
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {
                    "sliding_attention", "full_attention"}:
                raise ConfigError(f"gemma3_text layer_types {self.layer_types} must give each of the "
                                  f"{self.num_hidden_layers} layers sliding_attention or full_attention")
        elif self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act {self.hidden_act!r} is not supported (SwiGLU with silu only)")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> TextConfig:
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_TEXT_TYPES:
            raise ConfigError(f"text model_type {model_type!r} is not supported; supported: {SUPPORTED_TEXT_TYPES}")
        if model_type == "gemma3_text":
            return _gemma3_from_hf(d)
        qwen2 = model_type in _QWEN2_TYPES
        attention_bias = bool(d.get("attention_bias", False))
        heads = d.get("num_attention_heads", 32)
        window = d.get("sliding_window") if d.get("use_sliding_window", model_type == "mistral") else None
        return cls(
            model_type=model_type,
            vocab_size=d.get("vocab_size", 32000),
            hidden_size=d.get("hidden_size", 4096),
            intermediate_size=d.get("intermediate_size", 11008),
            num_hidden_layers=d.get("num_hidden_layers", 32),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or 0,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(d),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=d.get("hidden_act", "silu"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=window,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        if self.model_type == "gemma3_text":
            return _gemma3_to_hf(self)
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope.to_hf(),
            "rope_theta": self.rope.theta,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type in _QWEN2_TYPES:
            out["use_sliding_window"] = False
        else:
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out


def _gemma3_from_hf(d: dict[str, Any]) -> TextConfig:
    """Gemma 3's text config: transformers 5's `rope_parameters` per layer kind, or the released configs'
    `rope_theta` / `rope_scaling` (global layers) and `rope_local_base_freq` (sliding ones)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(key) is not None:
            raise ConfigError(f"gemma3_text {key} is not supported (Gemma 3's checkpoints set none)")
    if d.get("use_bidirectional_attention"):
        raise ConfigError("gemma3_text use_bidirectional_attention (EmbeddingGemma) is not supported")
    params = d.get("rope_parameters") or {}
    if "full_attention" in params:
        full, local = RopeConfig.from_hf({"rope_parameters": params["full_attention"]}), \
            RopeConfig.from_hf({"rope_parameters": params["sliding_attention"]})
    else:
        full = RopeConfig.from_hf({"rope_scaling": d.get("rope_scaling"), "rope_theta": d.get("rope_theta", 1e6)})
        local = RopeConfig(theta=float(d.get("rope_local_base_freq", 10000.0)))
    layers = int(d.get("num_hidden_layers", 26))
    pattern = int(d.get("sliding_window_pattern", 6))
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(layers)]
    heads = d.get("num_attention_heads", 8)
    return TextConfig(
        model_type="gemma3_text", vocab_size=d.get("vocab_size", 262_208), hidden_size=d.get("hidden_size", 2304),
        intermediate_size=d.get("intermediate_size", 9216), num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads, head_dim=d.get("head_dim", 256),
        max_position_embeddings=d.get("max_position_embeddings", 131_072), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope=full, rope_local=local, qkv_bias=bool(d.get("attention_bias", False)),
        o_bias=bool(d.get("attention_bias", False)),
        hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)), sliding_window=d.get("sliding_window", 4096),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        layer_types=tuple(types), query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
    )


def _gemma3_to_hf(c: TextConfig) -> dict[str, Any]:
    assert c.rope_local is not None
    return {
        "model_type": "gemma3_text", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": {"full_attention": c.rope.to_hf(), "sliding_attention": c.rope_local.to_hf()},
        "hidden_activation": c.hidden_act, "tie_word_embeddings": c.tie_word_embeddings,
        "sliding_window": c.sliding_window, "layer_types": list(c.layer_types),
        "query_pre_attn_scalar": int(q) if (q := c.query_pre_attn_scalar or c.head_dim) == int(q) else q,
        "attention_bias": c.qkv_bias,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
    }
