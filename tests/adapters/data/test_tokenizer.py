"""Tests for adapters.data.tokenizer: ids, exact round trip on every task, save/load offline."""

import pytest
from transformers import AutoTokenizer

from adapters.data.synthetic import TASKS, SyntheticCaptions, vocabulary
from adapters.data.tokenizer import build_caption_tokenizer


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [SyntheticCaptions(task, "train", size=60)[i][1] for task in TASKS for i in range(60)]


def test_special_token_ids_and_layout() -> None:
    tok = build_caption_tokenizer(vocabulary())
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(vocabulary()) == 37
    assert tok.convert_ids_to_tokens([4]) == [vocabulary()[0]]
    assert tok.padding_side == "right"


def test_encode_adds_no_special_tokens_and_lowercases() -> None:
    tok = build_caption_tokenizer(["a", "red", "circle"])
    assert tok("A Red circle")["input_ids"] == [4, 5, 6]
    assert tok("a blue circle")["input_ids"] == [4, 3, 6]  # unknown word -> <unk>


def test_round_trip_every_task(captions: list[str]) -> None:
    tok = build_caption_tokenizer(vocabulary())
    for text in captions:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert len(ids) == len(text.split())
        with_specials = [tok.bos_token_id, *ids, tok.eos_token_id, tok.pad_token_id]
        assert tok.decode(with_specials, skip_special_tokens=True) == text
    assert any("," in text for text in captions) and any("d'un" in text for text in captions)


def test_save_and_reload(tmp_path, captions: list[str]) -> None:
    tok = build_caption_tokenizer(vocabulary())
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) and loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
    )
    for text in captions[::7]:
        ids = loaded(text)["input_ids"]
        assert ids == tok(text)["input_ids"]
        assert loaded.decode(ids, skip_special_tokens=True) == text
    batch = loaded(["a", "a red circle"], padding=True)["input_ids"]
    assert batch[0][1:] == [0, 0]  # right padding with <pad>


def test_extra_vocab() -> None:
    tok = build_caption_tokenizer(["a", "b", "a"], extra_vocab_size=3)
    assert len(tok) == 4 + 2 + 3
    assert tok.convert_ids_to_tokens([6, 8]) == ["<extra_0>", "<extra_2>"]
    assert len(build_caption_tokenizer(["a"], 2, vocab_size=100)) == 100
    with pytest.raises(ValueError, match="raise vocab_size"):
        build_caption_tokenizer(["a", "b"], vocab_size=5)
    with pytest.raises(ValueError, match="whitespace"):
        build_caption_tokenizer(["a b"])
    with pytest.raises(ValueError, match="lowercase"):
        build_caption_tokenizer(["Red"])
