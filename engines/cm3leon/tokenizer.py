"""CM3Leon's joint vocabulary: byte-level BPE text tokens, then image codes.

Ids ``[0, text_vocab)`` are text: the special tokens first (``SPECIALS``,
always the same ids), then the BPE vocabulary trained with Hugging Face
``tokenizers``; ids ``[text_vocab, text_vocab + image_codes)`` are the image
tokenizer's codes, and a checkpoint trained on sound has the audio
tokenizer's codes after them. Text from a request never becomes a special token: the
string "<break>" encodes as its characters, and specials enter a sequence only
by id. The tokenizer travels in the checkpoint as its JSON.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MAX_SPANS = 16  # masked spans per document, each with its sentinel <mask:i>
SPECIALS = ("<pad>", "<eos>", "<break>", "<img>", "</img>", "<mask>", *(f"<mask:{i}>" for i in range(MAX_SPANS)),
            "<audio>", "</audio>")
PAD, EOS, BREAK, IMAGE_START, IMAGE_END, MASK = range(6)
AUDIO_START, AUDIO_END = SPECIALS.index("<audio>"), SPECIALS.index("</audio>")


def sentinel(span: int) -> int:
    """The id of ``<mask:span>``."""
    if not 0 <= span < MAX_SPANS:
        raise ValueError(f"span {span} is not in [0, {MAX_SPANS})")
    return MASK + 1 + span


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        for index, name in enumerate(SPECIALS):
            if tokenizer.token_to_id(name) != index:
                raise ValueError(f"the tokenizer's {name!r} is not id {index}")
        tokenizer.encode_special_tokens = True  # request text never turns into a special token
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, special tokens left out."""
        return self._tokenizer.decode([i for i in ids if i >= len(SPECIALS)])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a text token stands for (empty for specials): a stream
        of tokens is released byte-exactly, even where one character's UTF-8
        bytes fall into two tokens."""
        if token < len(SPECIALS):
            return b""
        return bytes(_UNICODE_TO_BYTE[char] for char in self._tokenizer.id_to_token(token))


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level pre-tokenizer's character for each byte, inverted: the
    printable bytes stand for themselves, the others for 256, 257, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_UNICODE_TO_BYTE = _byte_level_alphabet()
