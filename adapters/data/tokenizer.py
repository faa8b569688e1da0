"""A word-level caption tokenizer, built locally so the demo backbone needs no download.

The synthetic captions use a closed vocabulary of a few dozen words, so one token per word is
both the smallest model and the easiest to check. Layout of the vocabulary:

    0 <pad>   1 <bos>   2 <eos>   3 <unk>   then the words in the order given (duplicates
    dropped)   then filler tokens <extra_0>, <extra_1>, ... when a preset wants a larger vocab.

Text is lowercased and split on whitespace only (so "," and "d'un" stay single words), and
decoding joins tokens with single spaces with the tokenizer's clean-up turned off, so
encode -> decode(skip_special_tokens=True) is the identity on every canonical caption.

Encoding adds no special tokens: the model's sequence is [BOS] + image embeddings + caption +
[EOS], so the training code places <bos> and <eos> itself. Padding is on the right (training);
batched generation must set ``tokenizer.padding_side = "left"`` for its prompts.

Usage::

    tok = build_caption_tokenizer(vocabulary())
    tok.save_pretrained("var/backbone")          # AutoTokenizer.from_pretrained() loads it
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def build_caption_tokenizer(
    words: Sequence[str],
    extra_vocab_size: int = 0,
    *,
    vocab_size: int | None = None,
) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over words, wrapped for transformers.

    extra_vocab_size appends that many filler tokens ``<extra_N>``; vocab_size, when given,
    then pads with more fillers until the vocabulary has exactly that many entries (a preset
    whose LM has a fixed embedding table, e.g. 50,272 rows, asks for it this way).
    """
    if extra_vocab_size < 0:
        raise ValueError(f"extra_vocab_size must be >= 0, got {extra_vocab_size}")
    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not word or word != word.strip() or any(ch.isspace() for ch in word):
            raise ValueError(f"vocabulary word {word!r} is empty or contains whitespace")
        if word != word.lower():
            # The normaliser lowercases input first, so an uppercase entry could never match.
            raise ValueError(f"vocabulary word {word!r} must be lowercase")
        vocab.setdefault(word, len(vocab))
    fillers = extra_vocab_size
    if vocab_size is not None:
        if vocab_size < len(vocab) + extra_vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the {len(vocab) + extra_vocab_size} "
                "tokens needed (special tokens + words + extra_vocab_size); raise vocab_size"
            )
        fillers = vocab_size - len(vocab)
    for n in range(fillers):
        vocab[f"<extra_{n}>"] = len(vocab)

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the Rust default joins tokens with one space, which is what we want.
    core.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="right",
        # The default clean-up would glue " ," into "," and break the round trip.
        clean_up_tokenization_spaces=False,
    )
