"""Every setting of the server in one class: CLI flags and `VLMSERVE_*` environment variables share these names."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vlmserve.model.audio_decode import AudioLimits

from .engine.config import CPU_KV_CACHE_MB, CUDA_KV_CACHE_SHARE, EngineConfig, ImageLimits

C = TypeVar("C", EngineConfig, ImageLimits)


def _whole_mb(mb: float | None) -> int | None:
    """An EngineConfig size (fractional MB allowed there) as the default of a whole-MB setting."""
    return None if mb is None else int(mb)


def default_model_path() -> str:
    """The embedded default model: `vlmserve/weights/shapes-llava` once installed, `weights/shapes-llava` in the
    source tree (an editable install maps the same relative path)."""
    return str(Path(__file__).resolve().parent.parent / "weights" / "shapes-llava")


class Settings(BaseSettings):
    """Server settings. Each field is also `--flag-name` on `vlmserve serve` and `VLMSERVE_FIELD_NAME` in the env."""

    model_config = SettingsConfigDict(env_prefix="VLMSERVE_", extra="ignore", protected_namespaces=())

    model: str = Field(default_factory=default_model_path, description="checkpoint directory or hub id")
    served_model_name: str | None = Field(None, description="model id in the API (default: directory name or hub id)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted Bearer keys, comma separated (empty: no auth)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins, comma separated (empty: CORS off)"
    )
    # A setting named like an EngineConfig (or ImageLimits) field takes its default from it, and `engine_config()`
    # (`image_limits()`) passes it on by that name: here, and vision_cache_mb, compile and weight_layout below.
    max_running: int = Field(
        EngineConfig.max_running, ge=1, description="most sequences in one step (reserves no memory)"
    )
    max_waiting: int = Field(
        EngineConfig.max_waiting, ge=0, description="requests queued beyond the free slots; past it: 429"
    )
    max_model_len: int | None = Field(
        EngineConfig.max_model_len, ge=16,
        description=f"context per sequence (default: model's, capped {EngineConfig.max_model_len_cap})",
    )
    kv_cache_mb: int | None = Field(
        _whole_mb(EngineConfig.kv_cache_mb), ge=1,
        description=f"KV block pool in MB (default: {CPU_KV_CACHE_MB} on CPU, {CUDA_KV_CACHE_SHARE:.0%} of free "
                    "memory on CUDA)",
    )
    block_size: int = Field(EngineConfig.block_size, ge=1, le=1024, description="tokens per KV block")
    max_num_batched_tokens: int = Field(
        EngineConfig.max_num_batched_tokens, ge=16, description="tokens in one step: decodes plus prefill chunks"
    )
    enable_prefix_caching: bool = Field(
        EngineConfig.enable_prefix_caching, description="reuse cached KV blocks of equal prompt prefixes and images"
    )
    max_tokens_default: int = Field(
        EngineConfig.max_tokens_default, ge=1, description="max_tokens when a request omits it (capped by context)"
    )
    max_body_bytes: int = Field(32 * 1024**2, ge=1024, description="request body cap; past it: 413")
    max_body_buffer_mb: int = Field(512, ge=1, description="request bodies held at once, all together; past it: 503")
    body_timeout: float = Field(60.0, gt=0, description="seconds a client gets to send its whole body; past it: 408")
    max_image_bytes: int = Field(
        ImageLimits.max_image_bytes, ge=1, description="one image's encoded bytes cap; past it: 413"
    )
    max_image_pixels: int = Field(
        ImageLimits.max_image_pixels, ge=1, description="one image's pixels (from its header); past it: 400"
    )
    max_images_per_request: int = Field(
        8, ge=0, description="images in one request; past it: 400"
    )
    max_mm_tokens_per_request: int | None = Field(
        None, ge=1, description="visual tokens of all of a request's images together; past it: 400 (none: no cap)"
    )
    max_audio_seconds: float = Field(
        AudioLimits.max_seconds, gt=0, description="one audio clip's duration (at most the model's window, the "
        "Whisper 30 s); past it: 400")
    max_audio_bytes: int = Field(
        AudioLimits.max_bytes, ge=1, description="one audio clip's encoded bytes cap; past it: 413")
    max_audios_per_request: int = Field(4, ge=0, description="audio clips in one request; past it: 400")
    max_stop_sequences: int = Field(8, ge=0, description="stop strings in one request; past it: 400")
    max_n: int = Field(8, ge=1, le=128, description="choices (`n`) in one chat request; past it: 400")
    vision_cache_mb: int = Field(int(EngineConfig.vision_cache_mb), ge=0, description="visual-token cache size")
    preprocess_workers: int = Field(4, ge=1, description="threads that decode and preprocess images")
    allow_remote_images: bool = Field(False, description="fetch http(s) image URLs (off: data URLs only)")
    remote_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts remote images may come from, comma separated"
    )
    remote_image_timeout: float = Field(5.0, gt=0, description="seconds for one remote image fetch")
    drain_timeout: float = Field(30.0, ge=0, description="seconds running requests get to finish on SIGTERM")
    compile: bool = Field(
        EngineConfig.compile,
        description="torch.compile the decode step at start, before /ready (needs a C++ compiler; eager without)",
    )
    weight_layout: Literal["auto", "standard", "input-major", "packed"] = Field(
        EngineConfig.weight_layout,
        description="CPU weight layout: packed (oneDNN) suits batches, input-major one stream; auto: by max-running"
    )
    chat_template: str | None = Field(
        None, description="a Jinja chat template (or a file holding one) used instead of the checkpoint's"
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json"] = Field(
        "auto", description="how tool calls are read from answers (vLLM's names); auto: from the chat template"
    )
    no_ui: bool = Field(False, description="do not serve the web chat page at / (the API is unchanged)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    # Scale-out on Ray Serve (server/scale/; `pip install "vlmserve[ray]"`). replicas 0: one process, no Ray.
    replicas: int = Field(0, ge=0, description="engine replicas on Ray Serve (0: one process, no Ray)")
    ray_address: str | None = Field(None, description="Ray cluster to join, e.g. ray://head:10001 or auto "
                                    "(default: start a local one)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling floor (set with --max-replicas)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling ceiling: scale on queue depth")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="autoscaling target: ongoing requests per replica"
    )
    replica_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves per engine replica (fractional)")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per engine replica (fractional: several on one GPU)")
    ingress_cpus: float = Field(0.25, ge=0, description="CPUs Ray reserves for the HTTP ingress")
    upscale_delay_s: float = Field(30.0, ge=0, description="autoscaling: seconds over target before adding a replica")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="autoscaling: seconds under target before removing a replica"
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Ray Serve: seconds between replica health checks")
    replica_routing: Literal["affinity", "round_robin"] = Field(
        "affinity", description="how requests pick a replica: by image content, or in turn (a baseline)"
    )
    affinity_imbalance: int = Field(
        8, ge=0, description="image-affinity routing yields to two-choices past this queue gap (requests)"
    )

    @field_validator("model", mode="before")
    @classmethod
    def _default_model(cls, value: object) -> object:
        return value if value not in (None, "") else default_model_path()

    @field_validator("served_model_name", "chat_template", mode="before")
    @classmethod
    def _empty_name(cls, value: object) -> object:
        return value or None

    @model_validator(mode="after")
    def _replica_bounds(self) -> Settings:
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("min_replicas needs max_replicas (autoscaling between the two)")
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is over max_replicas {self.max_replicas}")
        return self

    def chat_template_text(self) -> str | None:
        """`chat_template` read: a path to a file holding a template, or the template itself."""
        if self.chat_template is None:
            return None
        path = Path(self.chat_template).expanduser()
        if "{" not in self.chat_template and not path.is_file():
            raise ValueError(f"--chat-template {self.chat_template!r} is neither a file nor a Jinja template")
        return path.read_text(encoding="utf-8") if "{" not in self.chat_template else self.chat_template

    @field_validator("api_keys", "cors_origins", "remote_image_hosts", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def engine_config(self) -> EngineConfig:
        """The engine's config: every EngineConfig field that is also a setting, from it; the rest at defaults."""
        return self._by_name(EngineConfig)

    def image_limits(self) -> ImageLimits:
        """The preprocessing limits, each from the setting of the same name."""
        return self._by_name(ImageLimits)

    def audio_limits(self) -> AudioLimits:
        """The audio decoding caps (--max-audio-seconds, --max-audio-bytes)."""
        return AudioLimits(max_seconds=self.max_audio_seconds, max_bytes=self.max_audio_bytes)

    def _by_name(self, cls: type[C]) -> C:
        names = type(self).model_fields
        given: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(cls) if f.name in names}
        return cls(**given)

    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    def model_id(self) -> str:
        """The name clients use in `model`."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model).expanduser()
        return path.name if path.exists() else self.model


def settings_table() -> str:
    """The configuration table of the README: flag, environment variable, default, meaning."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        if name == "model":
            default = "the embedded SHAPES model"
        elif info.default_factory is not None:
            default = "(empty)"
        else:
            default = "(none)" if info.default is None else str(info.default).lower() if isinstance(
                info.default, bool) else str(info.default)
        flag = f"--{name.replace('_', '-')}"
        if info.annotation is bool and not name.startswith("no_"):
            flag += f" / --no-{name.replace('_', '-')}"
        rows.append(f"| `{flag}` | `VLMSERVE_{name.upper()}` | {default} | {info.description} |")
    return "\n".join(rows)
