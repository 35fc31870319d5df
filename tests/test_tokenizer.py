"""model/tokenizer.py (with messages.py, chat_template.py): chat encoding with image spans (parity with transformers'
LlavaProcessor, placeholder safety) and model/detokenizer.py, the incremental detokenizer (joined stream == full
decode)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlavaProcessor, PreTrainedTokenizerFast

from vlmserve.model.chat_template import LLAVA_15_CHAT_TEMPLATE
from vlmserve.model.detokenizer import IncrementalDetokenizer
from vlmserve.model.messages import ChatMessage, ImagePart, TextPart, count_images, parse_messages
from vlmserve.model.prompt import EncodedPrompt, ImageSpan
from vlmserve.model.tokenizer import ChatTokenizer

N_IMG = 16  # (32 / 8) ** 2 patches, CLS dropped ("default" strategy): what LlavaProcessor expands <image> to
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ckpt(clip_llama: Path) -> Path:
    """The session's tiny CLIP + Llama checkpoint (tests/conftest.py); tests that edit files copy it first."""
    return clip_llama


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def processor(ckpt: Path) -> LlavaProcessor:
    return LlavaProcessor.from_pretrained(ckpt)


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    """Tokenizer-side files only (cheap), for tests that edit them."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, dst / f.name)
    return dst


def _hf_parts(messages: list[dict]) -> list[dict]:
    """Messages as transformers' processor takes them (image parts as {"type": "image"})."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [p if p["type"] == "text" else {"type": "image"} for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def _processor_ids(processor: LlavaProcessor, messages: list[dict]) -> tuple[str, list[int]]:
    prompt = processor.apply_chat_template(_hf_parts(messages), add_generation_prompt=True)
    n = count_images(messages)
    images = [Image.new("RGB", (40 + 8 * i, 36), (30 * i, 200, 10)) for i in range(n)] or None
    ids = processor(images=images, text=prompt)["input_ids"]
    return prompt, list(ids[0])


IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
CONVERSATIONS = {
    "one-image": [{"role": "user", "content": [IMG, {"type": "text", "text": "What color is the circle?"}]}],
    "two-images": [
        {
            "role": "user",
            "content": [
                IMG,
                {"type": "text", "text": "Compare"},
                {"type": "image"},
                {"type": "text", "text": " these."},
            ],
        }
    ],
    "system": [
        {"role": "system", "content": "You answer with one word."},
        {"role": "user", "content": [IMG, {"type": "text", "text": "how many shapes are there?"}]},
    ],
    "multi-turn": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [IMG, {"type": "text", "text": "What shape is this?"}]},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one? café 東京 🙂"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a blue square"}]},
        {"role": "user", "content": "Which is bigger?"},
    ],
    "text-only": [{"role": "user", "content": "describe the picture"}],
}


# ----------------------------------------------------------------------------------------------------- properties


def test_properties(tok: ChatTokenizer, ckpt: Path) -> None:
    assert tok.bos_token_id == tok.tokenizer.convert_tokens_to_ids("<s>")
    assert tok.pad_token_id == tok.tokenizer.convert_tokens_to_ids("<pad>")
    assert tok.image_token_id == tok.tokenizer.convert_tokens_to_ids("<image>")
    assert tok.eos_token_ids == (tok.tokenizer.convert_tokens_to_ids("</s>"),)
    assert tok.vocab_size == len(tok.tokenizer) == 320
    assert tok.vocab_size == AutoTokenizer.from_pretrained(ckpt).vocab_size


@pytest.mark.parametrize("eos", [7, [2, 7, 9]])
def test_eos_ids_from_generation_config(ckpt: Path, tmp_path: Path, eos: int | list[int]) -> None:
    path = _copy_checkpoint(ckpt, tmp_path / "ck")
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = eos
    (path / "generation_config.json").write_text(json.dumps(gen))
    tok = ChatTokenizer.from_pretrained(path)
    expected = [2] + [e for e in ([eos] if isinstance(eos, int) else eos) if e != 2]
    assert list(tok.eos_token_ids) == expected


def test_image_token_id_follows_config(ckpt: Path, tmp_path: Path) -> None:
    """Slots carry the model's image_token_index; the template's placeholder is still found by its string."""
    path = _copy_checkpoint(ckpt, tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    config["image_token_index"] = 300
    (path / "config.json").write_text(json.dumps(config))
    tok = ChatTokenizer.from_pretrained(path)
    enc = tok.encode_chat(CONVERSATIONS["one-image"], num_image_tokens=4)
    assert tok.image_token_id == 300
    assert enc.input_ids.count(300) == 4 and 3 not in enc.input_ids


# ----------------------------------------------------------------------------------------------------- messages


def test_parse_messages() -> None:
    parsed = parse_messages(CONVERSATIONS["two-images"] + [{"role": "assistant", "content": None}])
    assert parsed[0] == ChatMessage(
        "user", (ImagePart("data:image/png;base64,AAAA"), TextPart("Compare"), ImagePart(), TextPart(" these."))
    )
    assert parsed[1].content == ""
    assert count_images(CONVERSATIONS["multi-turn"]) == 2
    for bad in (
        [],
        [{"role": "function", "content": "x"}],
        [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}],
        [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}],
        [{"role": "user", "content": [{"type": "video"}]}],  # audio parts are supported (test_audio.py)
        [{"role": "user", "content": [{"type": "text", "text": 3}]}],
        [{"role": "user", "content": {"type": "text", "text": "x"}}],
        ["hello"],
    ):
        with pytest.raises(ValueError):
            parse_messages(bad)


# ------------------------------------------------------------------------------------------------- parity with HF


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_parity_with_llava_processor(tok: ChatTokenizer, processor: LlavaProcessor, name: str) -> None:
    messages = CONVERSATIONS[name]
    prompt, expected = _processor_ids(processor, messages)
    enc = tok.encode_chat(messages, num_image_tokens=N_IMG)
    assert enc.prompt == prompt == tok.apply_chat_template(messages)
    assert enc.input_ids == expected
    assert not enc.prepend_images
    assert enc.num_images == count_images(messages)
    for span in enc.image_spans:
        assert span.length == N_IMG
        assert set(enc.input_ids[span.start : span.end]) == {tok.image_token_id}
    assert enc.input_ids.count(tok.image_token_id) == enc.num_image_tokens == N_IMG * enc.num_images


def test_typed_message_objects_match_dicts(tok: ChatTokenizer) -> None:
    typed = [ChatMessage("user", (ImagePart(), TextPart("What color is the circle?")))]
    assert tok.encode_chat(typed, num_image_tokens=N_IMG) == tok.encode_chat(
        CONVERSATIONS["one-image"], num_image_tokens=N_IMG
    )


def test_per_image_token_counts(tok: ChatTokenizer) -> None:
    enc = tok.encode_chat(CONVERSATIONS["two-images"], num_image_tokens=[3, 5])
    assert [s.length for s in enc.image_spans] == [3, 5]
    first, second = enc.image_spans
    assert first.end < second.start
    assert enc.input_ids.count(tok.image_token_id) == 8
    with pytest.raises(ValueError, match="2 image part"):
        tok.encode_chat(CONVERSATIONS["two-images"], num_image_tokens=[3])
    with pytest.raises(ValueError, match="positive"):
        tok.encode_chat(CONVERSATIONS["two-images"], num_image_tokens=0)


def test_no_generation_prompt(tok: ChatTokenizer) -> None:
    with_prompt = tok.encode_chat(CONVERSATIONS["one-image"], num_image_tokens=2)
    without = tok.encode_chat(CONVERSATIONS["one-image"], num_image_tokens=2, add_generation_prompt=False)
    assert with_prompt.prompt.endswith("ASSISTANT:") and not without.prompt.endswith("ASSISTANT:")
    assert with_prompt.input_ids[: len(without.input_ids) - 1] == without.input_ids[:-1]


# ------------------------------------------------------------------------------------------ placeholder safety


def _user(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [*([{"type": "image"}] * images), {"type": "text", "text": text}]}]


@pytest.mark.parametrize("images", [0, 1, 2])
@pytest.mark.parametrize(
    "text",
    [
        "What is <image> this?",
        "<image>",
        "<image><image><image>",
        "<image>\n<image>\nstart",
        "end</s> and <s> and <pad>",
        "<<image>>image>",
        "</s></s><s>",
    ],
)
def test_typed_placeholder_is_plain_text(tok: ChatTokenizer, text: str, images: int) -> None:
    enc = tok.encode_chat(_user(text, images), num_image_tokens=N_IMG)
    special = {tok.bos_token_id, tok.pad_token_id, *tok.eos_token_ids}
    assert enc.num_images == images
    assert enc.input_ids.count(tok.image_token_id) == images * N_IMG
    assert enc.input_ids[0] == tok.bos_token_id
    assert not special & set(enc.input_ids[1:])
    # the typed text comes back verbatim: it was tokenized as ordinary bytes
    prefix = "USER: " + "\n" * images
    assert tok.decode(enc.input_ids) == f"{prefix}{text} ASSISTANT:"
    assert enc.prompt == "USER: " + "<image>\n" * images + f"{text} ASSISTANT:"


def test_typed_placeholder_in_every_role(tok: ChatTokenizer) -> None:
    messages = [
        {"role": "system", "content": "Say <image> never </s>"},
        {"role": "user", "content": [IMG, {"type": "text", "text": "<image>?"}]},
        {"role": "assistant", "content": "It is <image></s>"},
        {"role": "user", "content": "<image> again"},
    ]
    enc = tok.encode_chat(messages, num_image_tokens=N_IMG)
    assert enc.input_ids.count(tok.image_token_id) == N_IMG
    assert enc.input_ids.count(tok.eos_token_ids[0]) == 1  # only the template's, after the assistant turn
    assert tok.decode(enc.input_ids).count("<image>") == 4


def test_typed_text_with_private_use_characters(tok: ChatTokenizer) -> None:
    """The sentinels never collide with what a client writes, whatever characters it uses."""
    text = "\ue000\ue001 <image> \ue0020\ue003 \ue000" + "0" + "\ue001"
    enc = tok.encode_chat(_user(text), num_image_tokens=N_IMG)
    assert enc.input_ids.count(tok.image_token_id) == N_IMG
    assert tok.decode(enc.input_ids) == f"USER: \n{text} ASSISTANT:"


def test_plain_text_segments_tokenize_like_transformers(tok: ChatTokenizer, processor: LlavaProcessor) -> None:
    """Text around a typed placeholder in another turn keeps the exact HF tokenization."""
    clean = tok.encode_chat(CONVERSATIONS["multi-turn"], num_image_tokens=N_IMG)
    poisoned = CONVERSATIONS["multi-turn"] + [{"role": "assistant", "content": "a <image>"}]
    enc = tok.encode_chat(poisoned, num_image_tokens=N_IMG, add_generation_prompt=False)
    # everything up to the generation prompt of the clean conversation is identical
    shared = len(clean.input_ids) - len(tok.encode_text("ASSISTANT:"))
    assert enc.input_ids[:shared] == clean.input_ids[:shared]


@HYPOTHESIS
@given(
    text=st.lists(
        st.sampled_from(["<image>", "</s>", "<s>", "<pad>", "<", ">", "image", "/s", " ", "\n", "é", "東", "🙂", "a b"])
        | st.text(max_size=6),
        max_size=12,
    ).map("".join),
    images=st.integers(0, 2),
)
def test_property_image_slots_only_from_parts(tok: ChatTokenizer, text: str, images: int) -> None:
    enc = tok.encode_chat(_user(text, images), num_image_tokens=N_IMG)
    assert enc.input_ids.count(tok.image_token_id) == images * N_IMG
    assert [s.length for s in enc.image_spans] == [N_IMG] * images
    assert tok.decode(enc.input_ids) == "USER: " + "\n" * images + f"{text} ASSISTANT:"


@HYPOTHESIS
@given(
    text=st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=40),
    images=st.integers(0, 2),
)
def test_property_parity_with_hf_tokenizer(tok: ChatTokenizer, text: str, images: int) -> None:
    """Without typed control tokens, ids are HF's tokenization of the rendered prompt, placeholders expanded."""
    messages = _user(text, images)
    enc = tok.encode_chat(messages, num_image_tokens=N_IMG)
    hf_ids = tok.tokenizer(enc.prompt)["input_ids"]
    expected = [i for t in hf_ids for i in ([t] * N_IMG if t == tok.image_token_id else [t])]
    assert enc.input_ids == expected


# ------------------------------------------------------------------------------------------------- templates


def test_placeholder_count_mismatch_raises(tok: ChatTokenizer) -> None:
    always_one = "{% for m in messages %}<image>\n{{ m['content'] if m['content'] is string else '' }}{% endfor %}"
    custom = ChatTokenizer(tok.tokenizer, chat_template=always_one)
    with pytest.raises(ValueError, match="placeholder"):
        custom.encode_chat([{"role": "user", "content": "hi"}], num_image_tokens=N_IMG)
    with pytest.raises(ValueError, match="placeholder"):
        custom.encode_chat(_user("hi", images=2), num_image_tokens=N_IMG)
    # the llava template ignores image parts of assistant turns: 2 parts, 1 placeholder
    assistant_image = [*_user("hi"), {"role": "assistant", "content": [{"type": "image"}]}]
    with pytest.raises(ValueError, match="2 image part"):
        tok.encode_chat(assistant_image, num_image_tokens=N_IMG)


def test_placeholder_assembled_across_text_and_template_is_rejected(tok: ChatTokenizer) -> None:
    """A placeholder formed by user text plus template text is never silently taken for an image."""
    gluing = "{% for m in messages %}{{ m['content'] }}ge>{% endfor %}"
    custom = ChatTokenizer(tok.tokenizer, chat_template=gluing)
    with pytest.raises(ValueError):
        custom.encode_chat([{"role": "user", "content": "<ima"}], num_image_tokens=N_IMG)


def test_template_exception_is_a_value_error(tok: ChatTokenizer) -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}x"
    with pytest.raises(ValueError, match="first turn must be user"):
        ChatTokenizer(tok.tokenizer, chat_template=strict).encode_chat(
            [{"role": "assistant", "content": "hi"}], num_image_tokens=1
        )


def test_placeholder_that_is_not_one_token_raises(tok: ChatTokenizer) -> None:
    template = LLAVA_15_CHAT_TEMPLATE.replace("<image>", "[IMG]")
    custom = ChatTokenizer(tok.tokenizer, chat_template=template, image_token="[IMG]", image_token_id=3)
    with pytest.raises(ValueError, match="tokenize to 0"):
        custom.encode_chat(_user("hi"), num_image_tokens=N_IMG)


def test_template_without_placeholder_prepends_images(tok: ChatTokenizer) -> None:
    text_only = (
        "{% for m in messages %}{{ m['role'] }}: "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
        "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    custom = ChatTokenizer(tok.tokenizer, chat_template=text_only)
    enc = custom.encode_chat(_user("what <image> is it?", images=2), num_image_tokens=[4, 6])
    assert enc.prepend_images
    assert enc.image_spans == (ImageSpan(0, 4), ImageSpan(4, 6))
    assert enc.input_ids[:10] == [tok.image_token_id] * 10
    assert enc.input_ids[10:] == custom.encode_chat(_user("what <image> is it?", 0), num_image_tokens=1).input_ids
    assert enc.input_ids.count(tok.image_token_id) == 10
    plain = custom.encode_chat(_user("hello", images=0), num_image_tokens=N_IMG)
    assert plain == EncodedPrompt(plain.input_ids, (), prepend_images=False, prompt="user: hello\nassistant:")


def test_template_bos_is_not_doubled(tok: ChatTokenizer) -> None:
    with_bos = ChatTokenizer(tok.tokenizer, chat_template="{{ bos_token }}" + LLAVA_15_CHAT_TEMPLATE)
    enc = with_bos.encode_chat(_user("hi"), num_image_tokens=2)
    assert enc.prompt.startswith("<s>USER: ")
    assert enc.input_ids == tok.encode_chat(_user("hi"), num_image_tokens=2).input_ids


def test_default_template_when_checkpoint_has_none(ckpt: Path, tmp_path: Path) -> None:
    path = _copy_checkpoint(ckpt, tmp_path / "ck")
    (path / "chat_template.jinja").unlink()
    processor_config = json.loads((path / "processor_config.json").read_text())
    processor_config.pop("chat_template", None)
    (path / "processor_config.json").write_text(json.dumps(processor_config))
    tok = ChatTokenizer.from_pretrained(path)
    assert tok.chat_template == LLAVA_15_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        *_user("What is this?"),
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": "Its color?"},
    ]
    assert tok.apply_chat_template(_user("What is this?")) == "USER: <image>\nWhat is this? ASSISTANT:"
    assert tok.apply_chat_template(messages) == (
        "Be brief.\nUSER: <image>\nWhat is this? ASSISTANT: a circle</s>USER: Its color? ASSISTANT:"
    )
    enc = tok.encode_chat(messages, num_image_tokens=N_IMG)
    assert enc.input_ids.count(tok.image_token_id) == N_IMG and not enc.prepend_images


def test_processor_template_file_wins(ckpt: Path, tmp_path: Path) -> None:
    path = _copy_checkpoint(ckpt, tmp_path / "ck")
    template = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert ChatTokenizer.from_pretrained(path).chat_template == template


# ------------------------------------------------------------------------------------------------- plain text


def test_encode_text(tok: ChatTokenizer) -> None:
    ids = tok.encode_text("a <image> b </s>")
    assert tok.image_token_id not in ids and tok.eos_token_ids[0] not in ids
    assert tok.decode(ids) == "a <image> b </s>"
    assert tok.encode_text("<image>", parse_special_tokens=True) == [tok.image_token_id]
    assert tok.encode_text("hi", add_special_tokens=True)[0] == tok.bos_token_id
    assert tok.encode_text("red circle") == tok.tokenizer("red circle", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------- detokenizer


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids] + [detok.flush()]


REAL_TEXTS = [
    "What color is the circle? red",
    "café naïve über straße",
    "東京 привет 🙂 émoji",
    "🙂🙂🙂東京東京",
    "a \ufffd b",  # a real replacement character in the text
    "\n\n  spaced   out  \t!",
    "👩‍👩‍👧 family, 🇫🇷 flag, ZWJ sequences",
]


@pytest.mark.parametrize("text", REAL_TEXTS)
def test_detokenizer_real_text(tok: ChatTokenizer, text: str) -> None:
    ids = [tok.bos_token_id, *tok.encode_text(text), *tok.eos_token_ids]
    deltas = _stream(tok.detokenizer(), ids)
    assert "".join(deltas) == text == tok.tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_holds_back_partial_characters(tok: ChatTokenizer) -> None:
    for char in ("猫", "😀", "ü"):  # not in the training corpus: byte tokens
        ids = tok.encode_text(char)
        assert len(ids) > 1, "the tiny tokenizer splits this character over byte tokens"
        detok = tok.detokenizer()
        assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + [char]
        assert detok.flush() == ""
    # cut short: the incomplete character flushes as U+FFFD, as a full decode would
    ids = tok.encode_text("a😀")[:-1]
    detok = tok.detokenizer()
    assert "".join(detok.push(i) for i in ids) == "a"
    assert detok.flush() == "\ufffd" == tok.decode(ids)[-1]


def test_detokenizer_skips_special_tokens(tok: ChatTokenizer) -> None:
    detok = tok.detokenizer()
    specials = [tok.bos_token_id, tok.image_token_id, tok.pad_token_id, *tok.eos_token_ids]
    assert [detok.push(i) for i in specials] == [""] * len(specials)
    assert detok.push_many(tok.encode_text("red")) == "red"
    assert detok.flush() == ""


def test_detokenizer_context_is_not_emitted(tok: ChatTokenizer) -> None:
    context = tok.encode_text("USER: hi ASSISTANT:")
    generated = tok.encode_text(" a red 東京")
    detok = tok.detokenizer(context_ids=context)
    assert "".join(_stream(detok, generated)) == " a red 東京"
    assert detok.num_tokens == len(generated)


def test_detokenizer_decodes_a_small_window(tok: ChatTokenizer) -> None:
    """Each step decodes the tokens since the last emission, not the whole sequence."""
    windows: list[int] = []

    class Recording:
        def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
            windows.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    text = " ".join(REAL_TEXTS * 20)
    ids = tok.encode_text(text)
    assert len(ids) > 1000
    assert "".join(_stream(IncrementalDetokenizer(Recording()), ids)) == text
    assert max(windows) <= 8


@HYPOTHESIS
@given(ids=st.lists(st.integers(0, 319), max_size=60))
def test_property_stream_equals_full_decode(tok: ChatTokenizer, ids: list[int]) -> None:
    joined = "".join(_stream(tok.detokenizer(), ids))
    assert joined == tok.decode(ids) == tok.tokenizer.decode(ids, skip_special_tokens=True)


@HYPOTHESIS
@given(
    text=st.text(st.sampled_from("ab é東京🙂\n?привет"), max_size=30),
    extra=st.lists(st.integers(0, 319), max_size=5),
)
def test_property_stream_of_text_and_noise(tok: ChatTokenizer, text: str, extra: list[int]) -> None:
    ids = [*extra, *tok.encode_text(text), *extra]
    assert "".join(_stream(tok.detokenizer(), ids)) == tok.tokenizer.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------ SentencePiece-style tokenizer
# Llama's tokenizer family: Metaspace "▁" with prepend_scheme "first", byte-fallback tokens <0xNN>.


@pytest.fixture(scope="module")
def sp_tok() -> ChatTokenizer:
    return _sentencepiece_tokenizer()


def _sentencepiece_tokenizer() -> ChatTokenizer:
    rng = random.Random(0)
    words = [
        "what",
        "color",
        "is",
        "the",
        "circle",
        "red",
        "green",
        "blue",
        "café",
        "東京",
        "🙂",
        "über",
        "shape",
        "a",
        "b",
    ]
    corpus = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(500)]
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
    )
    specials = ["<unk>", "<s>", "</s>", "<image>"]
    backend.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    )
    spec = json.loads(backend.to_str())
    for byte in range(256):  # byte-fallback pieces belong to the model vocabulary, as in Llama's
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return ChatTokenizer(fast, chat_template=LLAVA_15_CHAT_TEMPLATE)


@pytest.mark.parametrize("text", ["What color is the circle?", " leading space", "猫 and 😀, über東京", ""])
def test_sentencepiece_parity(sp_tok: ChatTokenizer, text: str) -> None:
    enc = sp_tok.encode_chat(_user(text, images=2), num_image_tokens=3)
    hf_ids = sp_tok.tokenizer(enc.prompt)["input_ids"]
    assert enc.input_ids == [i for t in hf_ids for i in ([t] * 3 if t == sp_tok.image_token_id else [t])]


@pytest.mark.parametrize("text", ["a <image> b", "<image>", "x </s> <s>y", "猫<image>😀"])
def test_sentencepiece_typed_control_tokens(sp_tok: ChatTokenizer, text: str) -> None:
    """Typed control tokens are plain text, and the text around them gets no extra "▁" from being re-encoded."""
    enc = sp_tok.encode_chat([*_user(text), {"role": "user", "content": text}], num_image_tokens=3)
    assert enc.input_ids.count(sp_tok.image_token_id) == 3
    assert enc.input_ids.count(sp_tok.bos_token_id) == 1 and sp_tok.eos_token_ids[0] not in enc.input_ids
    assert sp_tok.decode(enc.input_ids) == f"USER: \n{text} USER: {text} ASSISTANT:"


def _valid_utf8_ids(sp_tok: ChatTokenizer) -> st.SearchStrategy[list[int]]:
    """Random non-byte tokens mixed with whole characters spelled in byte-fallback tokens."""
    vocab = sp_tok.tokenizer.get_vocab()
    ordinary = sorted(i for t, i in vocab.items() if not t.startswith("<0x"))
    char_ids = st.characters(codec="utf-8", exclude_categories=("Cs",)).map(
        lambda c: [vocab[f"<0x{b:02X}>"] for b in c.encode()]
    )
    return st.lists(st.sampled_from(ordinary).map(lambda i: [i]) | char_ids, max_size=40).map(
        lambda chunks: [i for chunk in chunks for i in chunk]
    )


@HYPOTHESIS
@given(data=st.data())
def test_sentencepiece_stream_equals_full_decode(sp_tok: ChatTokenizer, data: st.DataObject) -> None:
    ids = data.draw(_valid_utf8_ids(sp_tok))
    deltas = _stream(sp_tok.detokenizer(), ids)
    full = sp_tok.tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == full == sp_tok.decode(ids)
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", ["What color is the circle? red", "猫 😀 über 東京", "  two  spaces"])
def test_sentencepiece_stream_keeps_spaces(sp_tok: ChatTokenizer, text: str) -> None:
    ids = sp_tok.encode_text(text)
    assert "".join(_stream(sp_tok.detokenizer(), ids)) == sp_tok.tokenizer.decode(ids)
    assert sp_tok.tokenizer.decode(ids) == (text[1:] if text.startswith(" ") else text)  # the decoder's strip


def test_sentencepiece_stream_with_prompt_context(sp_tok: ChatTokenizer) -> None:
    """A first generated "▁red" is " red" after the prompt: a few prompt ids give it its left context."""
    generated = sp_tok.encode_text("red circle")
    assert sp_tok.tokenizer.convert_ids_to_tokens(generated)[0] == "▁red"
    assert "".join(_stream(sp_tok.detokenizer(), generated)) == "red circle"
    context = sp_tok.encode_text("USER: hi ASSISTANT:", add_special_tokens=True)
    assert "".join(_stream(sp_tok.detokenizer(context_ids=context), generated)) == " red circle"


def test_lone_surrogates_from_json_become_replacement_characters(tok: ChatTokenizer) -> None:
    """JSON may carry "\\ud800"; it must tokenize (as U+FFFD), never crash the request."""
    import json

    text = json.loads('"a\\ud800b \\ud83d\\ude42"')
    enc = tok.encode_chat([{"role": "user", "content": [{"type": "text", "text": text}]}], num_image_tokens=16)
    assert "a\ufffdb \U0001f642" in tok.decode(enc.input_ids)
    enc2 = tok.encode_chat([{"role": "user", "content": text}], num_image_tokens=16)
    assert enc2.input_ids == enc.input_ids
