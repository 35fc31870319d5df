"""The world's text side: a corpus, a byte-level BPE trained on it with `tokenizers`, the llava-1.5 chat template, and
the token ids of prompts and answers exactly as the serving tokenizer (`vlmserve.model.tokenizer`) writes them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from vlmserve.model.tokenizer import ChatTokenizer

from .world import KINDS, all_questions, question_for, random_world

IMAGE_TOKEN = "<image>"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE_TOKEN]

# llava-1.5: "USER: <image>\n{question} ASSISTANT: {answer}</s>", over OpenAI-style content parts (images first).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join(' ') %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ text }}\n"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is not string %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% endif %}{{ text }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ text }}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def world_corpus(n_scenes: int, seed: int) -> list[str]:
    """Chat-formatted lines of questions and answers about random scenes, plus every question text."""
    rng = random.Random(seed)
    lines = [f"USER: {IMAGE_TOKEN}\n{q} ASSISTANT:" for q in all_questions()]
    for _ in range(n_scenes):
        world = random_world(rng)
        for kind in KINDS:
            qa = question_for(world, kind, rng)
            if qa is not None:
                lines.append(f"USER: {IMAGE_TOKEN}\n{qa[0]} ASSISTANT: {qa[1]}{EOS}")
    return lines


def train_tokenizer(vocab_size: int = 384, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the world corpus, wrapped for transformers, with the chat template set."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(world_corpus(2000, seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_text_side(
    out: Path, tokenizer: PreTrainedTokenizerFast, *, image_size: int, patch_size: int, num_additional: int = 1,
    strategy: str = "default",
) -> None:
    """Write the tokenizer, chat template, LlavaProcessor (CLIPImageProcessor inside) and generation config."""
    out.mkdir(parents=True, exist_ok=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=num_additional,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    generation = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": False,
        "temperature": 0.0,
        "max_new_tokens": 24,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


class PromptCodec:
    """Token ids of one-image chats as the serving tokenizer encodes them, cached per question and per answer."""

    def __init__(self, chat: ChatTokenizer, num_image_tokens: int) -> None:
        self.chat = chat
        self.num_image_tokens = num_image_tokens
        self.image_token_id = int(chat.image_token_id)  # type: ignore[arg-type]
        self.pad_id = int(chat.pad_token_id or 0)
        self.eos_id = chat.eos_token_ids[0]
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}
        probe = "How many shapes are there?"
        full = self._encode(probe, "two")
        prompt = self.prompt(probe)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template's prompt is not a prefix of the full conversation")
        self._answers["two"] = full[len(prompt) :]

    @staticmethod
    def messages(question: str, answer: str | None = None) -> list[dict[str, Any]]:
        """The OpenAI-style conversation: an image part, then the question; the answer as an assistant turn."""
        msgs: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def _encode(self, question: str, answer: str | None) -> list[int]:
        enc = self.chat.encode_chat(
            self.messages(question, answer), num_image_tokens=self.num_image_tokens,
            add_generation_prompt=answer is None,
        )
        return enc.input_ids

    def prompt(self, question: str) -> list[int]:
        """`<s>USER: ` + image slots + `\\n{question} ASSISTANT:`."""
        if question not in self._prompts:
            self._prompts[question] = self._encode(question, None)
        return self._prompts[question]

    def answer(self, text: str) -> list[int]:
        """The continuation ` {answer}</s>` after the prompt, as the full conversation tokenizes."""
        if text not in self._answers:
            probe = "How many shapes are there?"
            full = self._encode(probe, text)
            self._answers[text] = full[len(self.prompt(probe)) :]
        return self._answers[text]

    def decode(self, ids: list[int]) -> str:
        return self.chat.decode(ids, skip_special_tokens=True)
