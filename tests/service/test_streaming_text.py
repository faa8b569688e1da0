"""TextDeltas: streamed text pieces whose concatenation is the caption, one piece per token,
never half a character, with a real byte-level BPE tokenizer (trained here, offline) whose
tokens split multi-byte characters."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from adapters.data.tokenizer import build_caption_tokenizer
from service.api.captioning import TextDeltas

TEXTS = ["déjà vu 🐱 café", "un cercle rouge à gauche", "naïve 🐱🐱 façade — ok"]


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["a red circle", "un cercle rouge", "the cat"], trainer=trainer)
    return tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_text_and_never_split_a_character(
    byte_bpe: Tokenizer, text: str
) -> None:
    ids = byte_bpe.encode(text).ids
    decode = lambda prefix: byte_bpe.decode(list(prefix))  # noqa: E731
    # The tokenizer really does split characters: some prefixes decode to U+FFFD.
    assert any(decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    deltas = TextDeltas(decode)
    pieces = [deltas.add(token) for token in ids]
    assert len(pieces) == len(ids)  # one piece per token, some empty
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # the tokens that ended inside a character sent nothing yet
    assert deltas.finish(text) == ""


def test_a_prefix_that_decodes_differently_is_held_until_the_end() -> None:
    # A decoder whose earlier text changes as tokens arrive (e.g. clean-up rules).
    outputs = {1: "a b", 2: "ab c", 3: "ab cd"}

    def decode(ids: Sequence[int]) -> str:
        return outputs[len(ids)]

    deltas = TextDeltas(decode)
    assert deltas.add(7) == "a b"
    assert deltas.add(8) == ""  # "ab c" does not extend what was sent: nothing wrong goes out
    assert deltas.add(9) == ""
    assert deltas.finish("ab cd") == ""  # cannot take "a b" back; the result has the caption
    fresh = TextDeltas(decode)
    assert fresh.finish("ab cd") == "ab cd"


def test_the_word_level_caption_tokenizer_streams_word_by_word() -> None:
    tokenizer = build_caption_tokenizer(["two", "shapes", "red"])
    ids = [tokenizer.convert_tokens_to_ids(w) for w in ("two", "<eos>", "shapes")]
    deltas = TextDeltas(lambda p: tokenizer.decode(list(p), skip_special_tokens=True))
    assert [deltas.add(i) for i in ids] == ["two", "", " shapes"]
