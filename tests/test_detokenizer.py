"""Incremental detokenisation with a byte-level BPE: deltas never hold a broken character and
add up to the full decode."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ragws.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. \\frac{a}{b} = c_{i}^{2}",
    "café naïve façade résumé — “quotes” and ‘more’",
    "中文文本识别 日本語のテキスト 한국어",
    "emoji 🙂🚀 and math ∑ ∫ √ ≤ ≥",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


@pytest.mark.parametrize("text", [*CORPUS, "x中y🙂z", "  leading  spaces\nand\ttabs  "])
def test_deltas_add_up_and_never_break_a_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, skip_ids=frozenset({tokenizer.eos_token_id}))
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text


def _byte_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per UTF-8 byte, so every multi-byte character is split across tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte-to-symbol table: printable bytes map to themselves, the rest to 256+.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    assert set(table.values()) <= set(alphabet)
    return tokenizer.convert_tokens_to_ids([table[b] for b in text.encode()])


@pytest.mark.parametrize("text", ["中文", "é🙂 x", "a∑b"])
def test_split_characters_are_held_back_until_complete(tokenizer, text):
    ids = _byte_ids(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert all(REPLACEMENT not in d for d in deltas)
    assert "" in deltas  # a push that completed no character emitted nothing
    assert "".join(deltas) + detok.flush() == text


def test_random_token_streams_keep_the_invariant(tokenizer):
    rng = random.Random(0)
    vocab = [i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id]
    for _ in range(50):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 60))]
        detok = IncrementalDetokenizer(tokenizer)
        text = "".join(detok.push(i) for i in ids) + detok.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_never_become_text(tokenizer):
    eos = tokenizer.eos_token_id
    detok = IncrementalDetokenizer(tokenizer, skip_ids=frozenset({eos}))
    ids = tokenizer.encode("abc", add_special_tokens=False)
    out = "".join(detok.push(i) for i in [*ids, eos]) + detok.flush()
    assert out == "abc"
