"""Tokenizer + chat template wrapper, with image-span aware chat encoding.

`ChatTokenizer.encode_chat` turns OpenAI-style messages into token ids with one span of visual-token slots per image
part. Image positions come from image *parts* only: every special-token string a client writes in text (`<image>`,
`</s>`, ...) is swapped for a private sentinel before the template is rendered and tokenized as ordinary text
afterwards, so typed text can never become an image slot or a control token (the trap of vLLM #57740).

The encoded prompt is in model/prompt.py, the message types in model/messages.py, the template lookup in
model/chat_template.py, the sentinels and the message shapes templates read in model/chat_render.py, and the
incremental detokenizer (`ChatTokenizer.detokenizer`) in model/detokenizer.py.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jinja2 import TemplateError
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .chat_render import (
    Sentinel,
    client_texts,
    image_token_counts,
    image_view_counts,
    map_strings,
    to_hf,
    without_first_prepend,
    wrap_images,
)
from .chat_template import (
    LLAVA_15_CHAT_TEMPLATE,
    read_json,
    template_from_checkpoint,
    template_from_tokenizer,
    template_renders_tools,
)
from .detokenizer import IncrementalDetokenizer
from .messages import ChatMessage, parse_messages
from .pan_and_scan import image_text
from .prompt import EncodedPrompt, ImageSpan, PromptTooLong
from .token_pieces import TokenPieces

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_AUDIO_TOKEN = "<|AUDIO|>"  # Qwen2-Audio's placeholder



class ChatTokenizer:
    """A checkpoint's tokenizer and chat template, with image-span aware chat encoding."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        chat_template: str | None = None,
        image_token: str | None = None,
        image_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        image_wrap: tuple[str, Callable[[int], str]] | None = None,
        audio_token: str | None = None,
        audio_token_id: int | None = None,
    ) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise TypeError(f"{type(tokenizer).__name__} has no `tokenizers` backend; a fast tokenizer is required")
        self.tokenizer = tokenizer
        # (what the template writes for an image, the text an image of n crops becomes: an image token per view)
        # where a processor rewrites the prompt's text before tokenizing it (Gemma 3: <start_of_image> -> "\n\n" +
        # it + the image token + <end_of_image> + "\n\n", model/pan_and_scan.py's `image_text`): done to the
        # rendered prompt, image by image, then each image token expands to its view's slots
        self._image_wrap = image_wrap
        # Private copies of the Rust tokenizer: HF toggles `encode_special_tokens` on its shared backend per call,
        # which would race between threads. One copy parses added tokens, the other never does.
        self._backend = Tokenizer.from_str(backend.to_str())
        self._backend.encode_special_tokens = False
        self._backend_plain = Tokenizer.from_str(backend.to_str())
        self._backend_plain.encode_special_tokens = True
        # For text that continues a prompt mid-way: a Metaspace pre-tokenizer with prepend_scheme "first" adds its
        # "▁" only at offset 0 of the whole input, so a piece encoded on its own must not get one.
        self._backend_inner = without_first_prepend(self._backend_plain)

        if chat_template is None:
            chat_template = template_from_tokenizer(tokenizer)
        if chat_template is None:
            logger.info("no chat template in the checkpoint; using the llava-1.5 default")
            chat_template = LLAVA_15_CHAT_TEMPLATE
        self.chat_template = chat_template

        added = {int(i): tok for i, tok in tokenizer.added_tokens_decoder.items()}
        self._added_contents = {i: str(tok) for i, tok in added.items()}
        # Characters sentinels must avoid besides the message text's (computed once; the template can be long).
        self._reserved_chars = frozenset(chat_template).union(*self._added_contents.values())
        vocab = tokenizer.get_vocab()
        if image_token is None:
            image_token = getattr(tokenizer, "image_token", None)
        if image_token is None and image_token_id is not None:
            token = tokenizer.convert_ids_to_tokens(image_token_id)  # one id: one token (or None)
            image_token = token if isinstance(token, str) else None
        if image_token is None and DEFAULT_IMAGE_TOKEN in vocab:
            image_token = DEFAULT_IMAGE_TOKEN
        self.image_token: str | None = image_token
        # The id the template's placeholder tokenizes to, and the id the slots get (the model's image_token_index).
        self._placeholder_id: int | None = vocab.get(image_token) if image_token is not None else None
        if image_token_id is None:
            image_token_id = self._placeholder_id
        elif self._placeholder_id is not None and image_token_id != self._placeholder_id:
            logger.warning(
                "image_token_index %d differs from the tokenizer's id %d for %r; slots use %d",
                image_token_id,
                self._placeholder_id,
                image_token,
                image_token_id,
            )
        self._image_token_id = image_token_id
        # Audio (a model with an audio tower): the template's placeholder (`<|AUDIO|>`) and the slots' id.
        if audio_token is None and audio_token_id is not None:
            audio_token = DEFAULT_AUDIO_TOKEN if DEFAULT_AUDIO_TOKEN in vocab else None
        self.audio_token: str | None = audio_token
        self._audio_placeholder_id: int | None = vocab.get(audio_token) if audio_token is not None else None
        self._audio_token_id = audio_token_id if audio_token_id is not None else self._audio_placeholder_id

        # Every control-token string a client could type: escaped in message text before rendering.
        control = {str(tok) for tok in added.values() if tok.special}
        control.update(t for t in tokenizer.all_special_tokens if t)
        control.update(t for t in (image_token, audio_token) if t)
        self._control_tokens = tuple(sorted(control, key=lambda s: (-len(s), s)))
        self._control_index = {t: i for i, t in enumerate(self._control_tokens)}
        self._control_re = re.compile("|".join(re.escape(t) for t in self._control_tokens)) if control else None

        eos: list[int] = []
        for i in [tokenizer.eos_token_id, *eos_token_ids]:
            if i is not None and int(i) not in eos:
                eos.append(int(i))
        self._eos_token_ids = tuple(eos)

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, chat_template: str | None = None) -> ChatTokenizer:
        """Load the tokenizer, chat template (unless `chat_template` replaces it), EOS ids and image token of a
        checkpoint directory (or hub id)."""
        tokenizer = AutoTokenizer.from_pretrained(path)
        generation = read_json(path, "generation_config.json") or {}
        config = read_json(path, "config.json") or {}
        processor = read_json(path, "processor_config.json") or {}
        eos = generation.get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        image_token_id = config.get("image_token_index", config.get("image_token_id"))
        image_token, wrap = processor.get("image_token"), None
        if config.get("model_type") == "gemma3":  # its processor's image_token is <start_of_image>: the wrap's
            boi, eoi, image_token = tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token
            wrap = (boi, functools.partial(image_text, boi, image_token, eoi))
        audio = config if config.get("model_type") == "qwen2_audio" else read_json(path, "audio/config.json") or {}
        audio_token_id = audio.get("audio_token_index", audio.get("audio_token_id"))
        return cls(
            tokenizer,
            audio_token=processor.get("audio_token"),
            audio_token_id=int(audio_token_id) if audio_token_id is not None else None,
            chat_template=chat_template or template_from_checkpoint(path, tokenizer),
            image_token=image_token,
            image_token_id=int(image_token_id) if image_token_id is not None else None,
            eos_token_ids=eos_ids,
            image_wrap=wrap,
        )

    # -------------------------------------------------------------------------------------------------- properties

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the tokenizer's EOS and generation_config.json's `eos_token_id`(s)."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        bos: int | None = self.tokenizer.bos_token_id
        return bos

    @property
    def pad_token_id(self) -> int | None:
        pad: int | None = self.tokenizer.pad_token_id
        return pad

    @property
    def image_token_id(self) -> int | None:
        """The id of visual-token slots (the model's `image_token_index`)."""
        return self._image_token_id

    @property
    def audio_token_id(self) -> int | None:
        """The id of audio-token slots (the audio tower's `audio_token_index`); None without one."""
        return self._audio_token_id

    @property
    def vocab_size(self) -> int:
        """Size of the full vocabulary, added tokens included (what the embedding table must cover)."""
        return len(self.tokenizer)

    # ------------------------------------------------------------------------------------------------------- text

    def encode_text(
        self, text: str, *, add_special_tokens: bool = False, parse_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of `text`; special-token strings in it stay ordinary text unless `parse_special_tokens`."""
        backend = self._backend if parse_special_tokens else self._backend_plain
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`: the HF tokenizer's `decode` without `clean_up_tokenization_spaces` (not streamable)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one ordinary token spells: a text of n bytes is at least n / this many tokens."""
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        return max((len(self.pieces.piece(i)[1]) for i in range(self._backend.get_vocab_size())
                    if i not in special), default=1) or 1

    @functools.cached_property
    def pieces(self) -> TokenPieces:
        """Single tokens' text and bytes (logprobs report them)."""
        return TokenPieces(self._backend)

    def detokenizer(self, *, context_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one generated sequence."""
        return IncrementalDetokenizer(self, context_ids=context_ids)

    # ------------------------------------------------------------------------------------------------------- chat

    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template reads transformers' `tools` variable (else a request with tools is refused)."""
        return template_renders_tools(self.chat_template)

    def apply_chat_template(
        self, messages: Sequence[ChatMessage | Mapping[str, Any]], *, add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The rendered prompt text, exactly as the template writes it (for display; do not tokenize it)."""
        return self._render(parse_messages(messages), add_generation_prompt, lambda text: text, tools)

    def encode_chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        num_image_tokens: int | Sequence[int | Sequence[int]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        token_limit: int | None = None,
        num_audio_tokens: Sequence[int] = (),
    ) -> EncodedPrompt:
        """Render `messages` with the chat template and tokenize it, each image expanded to its visual-token slots.

        `num_image_tokens` is the slot count of every image, or one count per image part in message order: an int
        for an image of one view, the counts of its views for an image of several (the image, then its crops: the
        checkpoint's image wrap writes them, Gemma 3's pan and scan). Raises ValueError when the template writes a
        different (non-zero) number of image placeholders than there are image views. A template that writes none
        gets the slots prepended (`EncodedPrompt.prepend_images`). `tools` (OpenAI's function definitions) reach the
        template as transformers' `tools` variable; their text is escaped as messages'.
        Audio parts become `num_audio_tokens` slots each (one count per audio part), at the template's audio
        placeholders, which must match the parts one to one.
        """
        parsed = parse_messages(messages)
        views = image_view_counts(num_image_tokens, sum(m.num_images for m in parsed))
        counts = [n for view in views for n in view]
        n_images = len(counts)  # views: each its own span from here on
        n_audios = sum(m.num_audios for m in parsed)
        audio_counts = image_token_counts(list(num_audio_tokens), n_audios)
        if n_audios and self._audio_token_id is None:
            raise ValueError("the tokenizer has no audio token, so audio cannot be placed in the prompt")

        sentinel = Sentinel.choose(self._reserved_chars, client_texts(parsed, tools))
        prompt = self._render(parsed, add_generation_prompt, lambda text: self._escape(text, sentinel), tools)
        if self._image_wrap is not None:
            prompt = wrap_images(prompt, *self._image_wrap, [len(v) - 1 for v in views])
        elif len(views) != n_images:
            raise ValueError("this checkpoint's images are one view each; its prompt has no text for crops")
        display = sentinel.restore(prompt, self._control_tokens)
        if token_limit is not None:  # the rendered text's bytes bound its tokens: a prompt far over is not tokenized
            plain = self._control_re.sub("", display) if self._control_re is not None else display
            floor = len(plain.encode("utf-8", errors="replace")) // self.max_token_bytes
            if floor > token_limit:
                raise PromptTooLong(floor, token_limit)
        add_special = not (self.tokenizer.bos_token and prompt.startswith(self.tokenizer.bos_token))
        ids = self._encode_escaped(prompt, sentinel, add_special_tokens=add_special)

        slot = self._image_token_id
        if n_images and slot is None:
            raise ValueError("the tokenizer has no image token, so images cannot be placed in the prompt")
        placeholder = self._placeholder_id
        n_placeholders = 0 if placeholder is None else ids.count(placeholder)
        if self.image_token and prompt.count(self.image_token) != n_placeholders:
            raise ValueError(
                f"the chat template wrote {prompt.count(self.image_token)} image placeholder(s) {self.image_token!r} "
                f"but they tokenize to {n_placeholders} image token(s)"
            )
        if n_placeholders not in (0, n_images):
            raise ValueError(
                f"the chat template wrote {n_placeholders} image placeholder(s) {self.image_token!r} for {n_images} "
                f"image {'part(s)' if len(views) == n_images else 'view(s) (parts and their crops)'}; image parts and "
                "placeholders must match one to one"
            )
        prepend = n_images > 0 and n_placeholders == 0
        audio_placeholder, audio_slot = self._audio_placeholder_id, self._audio_token_id
        n_audio_placeholders = 0 if audio_placeholder is None else ids.count(audio_placeholder)
        if n_audio_placeholders != n_audios:
            raise ValueError(f"the chat template wrote {n_audio_placeholders} audio placeholder(s) "
                             f"{self.audio_token!r} for {n_audios} audio part(s); they must match one to one")
        audio_spans: list[ImageSpan] = []
        audios = iter(audio_counts)
        out: list[int] = []
        spans: list[ImageSpan] = []
        images = iter(counts)
        if prepend:  # the template ignores images: every image's slots go in front of the text
            assert slot is not None  # there are images (checked above)
            for n in counts:
                spans.append(ImageSpan(len(out), n))
                out.extend([slot] * n)
        for tok in ids:
            if tok == placeholder and not prepend:
                assert slot is not None  # a placeholder means there are images (checked above)
                n = next(images)
                spans.append(ImageSpan(len(out), n))
                out.extend([slot] * n)
            elif tok == audio_placeholder:
                assert audio_slot is not None  # placeholders match audio parts, which need a slot id (above)
                n = next(audios)
                audio_spans.append(ImageSpan(len(out), n))
                out.extend([audio_slot] * n)
            else:
                out.append(tok)
        # The slots are exactly the expanded image parts: any other image-token id means something slipped through.
        if self._image_token_id is not None and out.count(self._image_token_id) != sum(counts):
            raise ValueError("the prompt holds image token ids that do not come from image parts")
        if audio_slot is not None and out.count(audio_slot) != sum(audio_counts):
            raise ValueError("the prompt holds audio token ids that do not come from audio parts")
        return EncodedPrompt(out, tuple(spans), prepend_images=prepend, prompt=display,
                             audio_spans=tuple(audio_spans))

    # ---------------------------------------------------------------------------------------------------- helpers

    def _escape(self, text: str, sentinel: Sentinel) -> str:
        if self._control_re is None:
            return text
        return self._control_re.sub(lambda m: sentinel.wrap(self._control_index[m.group()]), text)

    def _render(self, messages: list[ChatMessage], add_generation_prompt: bool, transform: Callable[[str], str],
                tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        conversation = [to_hf(m, transform) for m in messages]
        try:
            rendered = self.tokenizer.apply_chat_template(
                conversation,
                tools=map_strings(list(tools), transform) if tools else None,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except TemplateError as e:  # templates reject conversations with raise_exception(...)
            raise ValueError(f"the chat template rejected the conversation: {e}") from e
        assert isinstance(rendered, str)  # tokenize=False: the rendered text
        return rendered

    def _encode_escaped(self, prompt: str, sentinel: Sentinel, *, add_special_tokens: bool) -> list[int]:
        """Tokenize a rendered prompt whose user text has sentinels in place of control-token strings.

        Every added token in `prompt` comes from the template. The whole prompt is encoded in one call (so text
        without typed control tokens tokenizes exactly as transformers does); each run of ordinary tokens between
        two added tokens that holds a sentinel is then re-encoded from its restored text with added-token parsing off.
        A boundary is a token matched as an added token in the text (its content is what it covers), or one the
        post-processor inserted (it covers nothing, like BOS); a byte-fallback token never is.
        """
        encoding = self._backend.encode(prompt, add_special_tokens=add_special_tokens)
        if not sentinel.occurs_in(prompt):
            return encoding.ids
        out: list[int] = []
        run_start = 0  # char offset where the current run of ordinary tokens begins
        run: list[int] = []

        def close_run(end: int) -> None:
            text = prompt[run_start:end]
            if sentinel.occurs_in(text):
                backend = self._backend_plain if run_start == 0 else self._backend_inner
                out.extend(backend.encode(sentinel.restore(text, self._control_tokens), add_special_tokens=False).ids)
            else:
                out.extend(run)
            run.clear()

        for tok, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            content = self._added_contents.get(tok)
            if content is not None and (start == end or content in prompt[start:end]):
                close_run(max(start, run_start))
                out.append(tok)
                run_start = max(run_start, end)
            else:
                run.append(tok)
        close_run(len(prompt))
        return out
