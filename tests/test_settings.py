"""Settings -> EngineConfig / ImageLimits: one name and one default for each serving setting.

A field of `EngineConfig` or `ImageLimits` named like a `Settings` field gets its value from that setting (by name,
so a new pair needs no wiring); the few engine-only fields are listed here, so that a new dataclass field must be
either named like a setting or added to that list on purpose.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from vlmserve.server.engine import EngineConfig, ImageLimits
from vlmserve.server.settings import Settings

ENGINE_ONLY = {EngineConfig: {"max_model_len_cap", "max_images_per_encode"}, ImageLimits: set()}
BUILD = {EngineConfig: Settings.engine_config, ImageLimits: Settings.image_limits}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VLMSERVE_"):
            monkeypatch.delenv(name)


def shared(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name in Settings.model_fields]


def other_value(name: str) -> Any:
    """A valid value for setting `name` that differs from its default."""
    info = Settings.model_fields[name]
    default = info.default
    if get_origin(info.annotation) is Literal:
        return next(choice for choice in get_args(info.annotation) if choice != default)
    if isinstance(default, bool):
        return not default
    if default is None:
        return 64  # max_model_len (>= 16), kv_cache_mb (>= 1)
    return default + 1


@pytest.mark.parametrize("cls", [EngineConfig, ImageLimits], ids=lambda c: c.__name__)
def test_every_dataclass_field_is_a_setting_or_engine_only(cls: type) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    assert names - set(Settings.model_fields) == ENGINE_ONLY[cls]


@pytest.mark.parametrize("cls", [EngineConfig, ImageLimits], ids=lambda c: c.__name__)
def test_defaults_are_the_dataclass_defaults(cls: type) -> None:
    for name in shared(cls):
        assert Settings.model_fields[name].default == getattr(cls, name), name
    assert BUILD[cls](Settings()) == cls()


@pytest.mark.parametrize("cls", [EngineConfig, ImageLimits], ids=lambda c: c.__name__)
def test_each_setting_reaches_the_config(cls: type) -> None:
    names = shared(cls)
    assert names
    for name in names:  # one at a time: each value lands in its own field, none in another's
        value = other_value(name)
        config = BUILD[cls](Settings(**{name: value}))
        assert getattr(config, name) == value, name
        assert config == dataclasses.replace(cls(), **{name: value}), name
    every = {name: other_value(name) for name in names}
    assert BUILD[cls](Settings(**every)) == cls(**every)


def test_environment_names_reach_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMSERVE_MAX_TOKENS_DEFAULT", "77")
    monkeypatch.setenv("VLMSERVE_VISION_CACHE_MB", "3")
    monkeypatch.setenv("VLMSERVE_COMPILE", "true")
    monkeypatch.setenv("VLMSERVE_MAX_IMAGE_PIXELS", "2000")
    s = Settings()
    config, limits = s.engine_config(), s.image_limits()
    assert (config.max_tokens_default, config.vision_cache_mb, config.compile) == (77, 3, True)
    assert limits.max_image_pixels == 2000


def test_server_state_builds_the_engine_from_settings(checkpoint_factory) -> None:
    """`ServerState.load` hands the engine and the preparer exactly what the settings say."""
    from vlmserve.server.state import ServerState

    settings = Settings(model=str(checkpoint_factory("clip-llama")), device="cpu", max_running=3, max_waiting=5,
                        max_model_len=200, max_tokens_default=9, kv_cache_mb=2, block_size=8,
                        max_num_batched_tokens=100, enable_prefix_caching=False, vision_cache_mb=1,
                        weight_layout="standard", max_image_bytes=12345, max_image_pixels=54321,
                        max_images_per_request=3, compile=False)  # compiling: seconds, not what this checks
    state = ServerState(settings)
    try:
        state.load()
        assert state.engine is not None and state.preparer is not None
        assert state.engine.config == settings.engine_config()
        assert state.engine.max_model_len == 200
        assert state.engine.vision_cache.max_bytes == 2**20  # vision_cache_mb, in bytes
        assert state.engine.weight_layout == "standard"
        assert state.preparer.limits == settings.image_limits()
    finally:
        state.close()


def test_settings_import_no_torch() -> None:
    """`vlmserve serve --help` builds its flags from Settings: the engine's dataclasses must not pull torch in."""
    code = "import sys, vlmserve.server.settings; print(sorted({'torch', 'PIL'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent, check=True)
    assert out.stdout.strip() == "[]"
