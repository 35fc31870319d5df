"""The chat template: which one a checkpoint ships, and the llava-1.5 default for one that ships none.

`template_from_checkpoint` looks where transformers' processor does, the multimodal template first:
chat_template.json, processor_config.json's `chat_template`, chat_template.jinja, then the tokenizer's own. A
checkpoint is a local directory or a hub id whose files are cached next to the tokenizer's; `read_json` reads one of
its JSON files either way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

# llava-1.5's prompt, "USER: <image>\n{text} ASSISTANT:", over OpenAI-style content parts: a system turn first, one
# `<image>\n` per image part at the start of its user turn, assistant turns closed by the EOS token. With `tools`,
# the functions are listed first in `<tools>` tags (terse: the SHAPES model's context is 256 tokens); an assistant
# turn's calls are written Hermes-style (`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, what the
# `hermes` parser reads) and a tool turn is a user turn in `<tool_response>` tags. Without tools the prompt is exactly
# llava-1.5's.
LLAVA_15_CHAT_TEMPLATE = (
    "{% if tools %}<tools>\n{% for tool in tools %}{{ (tool['function'] or tool) | tojson }}\n{% endfor %}</tools>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if content is string %}{% set text = content %}"
    "{% else %}{% set text = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    "{% endif %}"
    "{% if message['role'] == 'system' %}{{ text }}\n"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if content is not string %}{% for part in content %}{% if part['type'] == 'image' %}<image>\n"
    "{% endif %}{% endfor %}{% endif %}{{ text }} "
    "{% elif message['role'] == 'tool' %}USER: <tool_response>\n{{ text }}\n</tool_response> "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ text }}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>\n{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def template_renders_tools(template: str) -> bool:
    """Whether a chat template reads transformers' `tools` variable (it cannot show a model tools otherwise)."""
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
                                                         .parse(template))
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own environment ({% generation %}): read the text
        return re.search(r"\btools\b", template) is not None


# --------------------------------------------------------------------------------------------------- checkpoint files


def _local_file(path: str | os.PathLike[str], name: str) -> Path | None:
    if Path(path).is_dir():
        candidate = Path(path) / name
        return candidate if candidate.is_file() else None
    try:  # a hub id: the files are cached (or fetched) next to the tokenizer's
        from transformers.utils.hub import cached_file

        resolved = cached_file(
            str(path),
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None
    return Path(resolved) if resolved else None


def read_json(path: str | os.PathLike[str], name: str) -> dict[str, Any] | None:
    file = _local_file(path, name)
    if file is None:
        return None
    with file.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else None


def _pick_template(template: Any) -> str | None:
    """A template string, or the default one of a dict / list of named templates."""
    if isinstance(template, str):
        return template or None
    if isinstance(template, list):  # tokenizer_config's [{"name": ..., "template": ...}] form
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    if isinstance(template, Mapping):
        return _pick_template(template.get("default") or next(iter(template.values()), None))
    return None


def template_from_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str | None:
    return _pick_template(getattr(tokenizer, "chat_template", None))


def template_from_checkpoint(path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The multimodal (processor) template first, as transformers' processor uses it, then the tokenizer's."""
    for name in ("chat_template.json", "processor_config.json"):
        template = _pick_template((read_json(path, name) or {}).get("chat_template"))
        if template:
            return template
    jinja = _local_file(path, "chat_template.jinja")
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    return template_from_tokenizer(tokenizer)
