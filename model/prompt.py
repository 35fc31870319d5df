"""An encoded chat: token ids with the visual-token (and audio-token) slots in place, and where each span sits.

`ChatTokenizer.encode_chat` (model/tokenizer.py) makes them; the server's preparer fills the spans with images.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImageSpan:
    """`length` consecutive visual-token slots starting at `start` in `EncodedPrompt.input_ids`."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of a rendered chat with the visual-token slots (id = image_token_id) already in place.

    `image_spans[i]` belongs to the i-th image view of the conversation: each image part's views in order, one per
    part unless it has several (Gemma 3's pan and scan: the image, then its crops). `prepend_images` says the
    template had no image placeholder: the slots of all images then sit at the very front, before every text token
    (BOS included), and the model puts the visual tokens in front of the text embeddings.
    """

    input_ids: list[int]
    image_spans: tuple[ImageSpan, ...] = ()
    prepend_images: bool = False
    audio_spans: tuple[ImageSpan, ...] = ()  # the i-th audio part's slots (id = audio_token_id)
    prompt: str = field(default="", repr=False)  # the rendered template (user text as written), for logs and debug

    @property
    def num_images(self) -> int:
        return len(self.image_spans)

    @property
    def num_image_tokens(self) -> int:
        return sum(s.length for s in self.image_spans)

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptTooLong(ValueError):
    """The rendered prompt is surely over `limit` tokens: at least `floor` (from its bytes, before tokenizing)."""

    def __init__(self, floor: int, limit: int) -> None:
        super().__init__(f"the prompt is at least {floor} tokens; the limit is {limit}")
        self.floor, self.limit = floor, limit
