"""Load and save checkpoints (config.json + safetensors, sharded or not) in each family's Hub layout.

Each checkpoint key maps onto our module names by the family's own rules (`FamilySpec.load_rules`,
model/families/), then by the rules every family shares, first match wins:
- the hub's classic LLaVA layout: `language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`,
  `multi_modal_projector.*`;
- transformers 4.5x+/5.x in-memory names: `model.language_model.*`, `lm_head.*`, `model.vision_tower.*`,
  `model.multi_modal_projector.*` (with or without `vision_model.` under the tower);
- a bare `model.*` is the LM (Qwen2-VL's Hub layout: `model.layers.*`, `model.embed_tokens.*`).
We save each family's Hub layout (`FamilySpec.save_rules`), which transformers loads.

Our modules hold q/k/v (language model and vision tower) and gate/up as one matrix each, as nano-vllm's packed
modules do; checkpoints keep them apart. `_FUSED` names the parts: on load they are concatenated in order into the
fused tensor, on save the fused tensor is split back, so a checkpoint round-trips key for key.

The model is built on the meta device and the checkpoint's tensors are assigned into it as they are read, already on
the target device and in the target dtype: no randomly initialised copy is ever allocated.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .audio_weights import audio_sidecar, save_audio_sidecar, with_audio_sidecar
from .config import VLMConfig
from .registry import FamilySpec, KeyRules
from .vlm import VisionLanguageModel

log = logging.getLogger(__name__)

# (pattern on the checkpoint key, replacement giving our key), after the family's own (`FamilySpec.load_rules`);
# first match wins.
_SHARED_LOAD_RULES: KeyRules = (
    (r"^(?:model\.)?language_model\.lm_head\.", "language_model.lm_head."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "language_model."),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision_tower."),
    (r"^(?:model\.)?multi_modal_projector\.", "multi_modal_projector."),
    (r"^(?:model\.)?image_newline$", "image_newline"),
    (r"^model\.", "language_model."),  # a bare `model.*` LM (Qwen2-VL's Hub layout), last
)
# Checkpoint tensors that exist in some LLaVA checkpoints but play no part in LLaVA's forward.
_IGNORED = re.compile(
    r"^vision_tower\.(head\.|embeddings\.position_ids$)|rotary_emb\.inv_freq$|^language_model\.(?:model\.)?rotary"
)
_CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt")
# (our module path, the checkpoint's parts in order, the fused module): q/k/v and gate/up, one matmul each.
_FUSED: tuple[tuple[re.Pattern[str], tuple[str, ...], str], ...] = (
    (re.compile(r"^(language_model\.layers\.\d+\.self_attn\.)(q|k|v)_proj\.(weight|bias)$"), ("q", "k", "v"),
     "qkv_proj"),
    (re.compile(r"^(language_model\.layers\.\d+\.mlp\.)(gate|up)_proj\.(weight|bias)$"), ("gate", "up"),
     "gate_up_proj"),
    (re.compile(r"^(vision_tower\.encoder\.layers\.\d+\.self_attn\.)(q|k|v)_proj\.(weight|bias)$"), ("q", "k", "v"),
     "qkv_proj"),
)
_PARTS = {fused: parts for _, parts, fused in _FUSED}  # fused module -> the checkpoint's parts, in order
_FUSED_NAME = re.compile(rf"^(.*\.)({'|'.join(_PARTS)})\.(weight|bias)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files or tensors, or a layout we do not know."""


@functools.cache
def _load_rules(family: FamilySpec | None) -> tuple[tuple[re.Pattern[str], str], ...]:
    rules = (*family.load_rules, *_SHARED_LOAD_RULES) if family is not None else _SHARED_LOAD_RULES
    return tuple((re.compile(p), r) for p, r in rules)


def map_checkpoint_key(key: str, family: FamilySpec | None = None) -> str | None:
    """Our parameter name for a checkpoint key of `family` (None: the shared rules alone, LLaVA's layouts), or None
    for tensors the model does not use."""
    for pattern, repl in _load_rules(family):
        if pattern.match(key):
            ours = pattern.sub(repl, key, count=1)
            return None if _IGNORED.search(ours) else ours
    return None if _IGNORED.search(key) else key


def fused_part(name: str) -> tuple[str, int, int] | None:
    """For one part of a fused projection (`...self_attn.k_proj.weight`): (the fused tensor's name, the part's
    index, the number of parts); None for any other tensor."""
    for pattern, parts, fused in _FUSED:
        if m := pattern.match(name):
            prefix, part, kind = m.groups()
            return f"{prefix}{fused}.{kind}", parts.index(part), len(parts)
    return None


def split_fused(name: str, tensor: torch.Tensor, config: VLMConfig) -> list[tuple[str, torch.Tensor]]:
    """A fused projection's tensor as the checkpoint's parts (names and slices); any other tensor as itself."""
    m = _FUSED_NAME.match(name)
    if m is None:
        return [(name, tensor)]
    prefix, fused, kind = m.groups()
    parts = _PARTS[fused]
    sizes = [tensor.shape[0] // len(parts)] * len(parts)  # gate/up, and the vision tower's q/k/v: equal parts
    if fused == "qkv_proj" and prefix.startswith("language_model."):
        text = config.text  # grouped-query attention: k and v are narrower than q
        q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
        sizes = [q, kv, kv]
    return [(f"{prefix}{part}_proj.{kind}", piece) for part, piece in zip(parts, tensor.split(sizes), strict=True)]


def resolve_checkpoint(path_or_id: str | os.PathLike[str]) -> Path:
    """A local checkpoint directory, or a hub id fetched through huggingface_hub's cache.

    Offline (`HF_HUB_OFFLINE=1`, or no network) a hub id resolves from the local cache only; a local directory
    never touches the network.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a LLaVA-format checkpoint directory")
        return path
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"checkpoint {name!r} is neither a local directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=list(_CHECKPOINT_FILES)))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{name!r} is not in the local Hugging Face cache and the hub cannot be reached") from e
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"could not fetch {name!r} from the hub: {e}") from e


def _weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [ckpt / f for f in sorted(set(weight_map.values()))]
    single = ckpt / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(ckpt.glob("*.safetensors"))
    if others:
        return others
    raise CheckpointError(f"{ckpt} holds no safetensors weights (model.safetensors or a sharded index)")


def iter_checkpoint_tensors(
    ckpt: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    family: FamilySpec | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) for every used tensor of the checkpoint (of `family`'s layout), read lazily onto `device`
    in `dtype`."""
    for file in _weight_files(ckpt):
        with safe_open(str(file), framework="pt", device=str(torch.device(device))) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                ours = map_checkpoint_key(key, family)
                if ours is None:
                    continue
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                yield ours, t


def load_model(
    path_or_id: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_positions: int | None = None,
) -> VisionLanguageModel:
    """Build the model on the meta device and assign the checkpoint's tensors into it, in eval mode."""
    ckpt = resolve_checkpoint(path_or_id)
    config = with_audio_sidecar(VLMConfig.from_file(ckpt / "config.json"), ckpt)
    with torch.device("meta"):
        model = VisionLanguageModel(config, max_positions=max_positions)
    expected = {k for k in model.state_dict() if not (config.text.tie_word_embeddings and k.endswith("lm_head.weight"))}
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    pending: dict[str, dict[int, torch.Tensor]] = {}  # fused name -> the parts read so far
    tensors = iter_checkpoint_tensors(ckpt, device=device, dtype=dtype, family=config.spec)
    for name, tensor in audio_sidecar(tensors, ckpt, config, device=device, dtype=dtype):
        if (fused := fused_part(name)) is not None and fused[0] in expected:
            target, index, count = fused
            parts = pending.setdefault(target, {})
            parts[index] = tensor
            if len(parts) == count:
                state[target] = torch.cat([parts[i] for i in range(count)])  # (sum of outs, in) or (sum of outs,)
                del pending[target]
        elif name in expected:
            state[name] = tensor
        elif not name.endswith("lm_head.weight"):
            unexpected.append(name)
    missing = sorted(expected - state.keys() - pending.keys())
    missing += [f"{target} (the checkpoint has {len(parts)} of its parts)" for target, parts in pending.items()]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: the checkpoint does not match its config.json: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    _check_shapes(model, state)
    if config.text.tie_word_embeddings:
        state["language_model.lm_head.weight"] = state["language_model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.language_model.tie_weights()
    _materialize_buffers(model, torch.device(device))
    log.info("loaded %s (%s, %s) onto %s", ckpt, config.text.model_type, config.family, device)
    return model.eval()


def _check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, param in model.state_dict().items():
        if name in state and tuple(state[name].shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {name}: checkpoint shape {tuple(state[name].shape)}, "
                                  f"config implies {tuple(param.shape)}")


def _materialize_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (the rotary tables, computed at construction) are not in the checkpoint: move them."""
    rotary = model.language_model.rotary
    rotary.cos, rotary.sin = rotary.cos.to(device), rotary.sin.to(device)
    if isinstance(visual := getattr(model, "visual", None), torch.nn.Module):  # Qwen2-VL's 2-D rotary frequencies
        visual.inv_freq = visual.inv_freq.to(device)


def checkpoint_state(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """The model's tensors under its family's Hub key names (`FamilySpec.save_rules`), tied output embeddings stored
    once."""
    out: dict[str, torch.Tensor] = {}
    tied = model.config.text.tie_word_embeddings
    rules = model.config.spec.save_rules
    for fused_name, fused_tensor in model.state_dict().items():
        if tied and fused_name == "language_model.lm_head.weight":
            continue
        for name, tensor in split_fused(fused_name, fused_tensor, model.config):
            for prefix, target in rules:
                if name.startswith(prefix):
                    out[target + name[len(prefix) :]] = tensor.detach().contiguous().cpu()
                    break
    return out


def save_model(
    model: VisionLanguageModel,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    copy_from: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write config.json and safetensors (sharded past `max_shard_bytes`) in the family's Hub layout.

    `copy_from` names a checkpoint directory whose tokenizer, chat template, processor and generation configs are
    copied beside the weights.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = checkpoint_state(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    first = next(iter(state.values()))
    config = model.config.to_hf() | {"torch_dtype": str(first.dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if copy_from is not None:
        src = Path(copy_from)
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.startswith("model"):
                shutil.copy2(f, out / f.name)
    save_audio_sidecar(model, out, dtype=dtype, copy_from=Path(copy_from) if copy_from is not None else None)
    return out
