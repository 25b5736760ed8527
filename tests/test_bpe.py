"""numpygpt/bpe.py, the plain-Python BPE, against a hand computation and the fast trainer."""

import pydoc_data.topics
from hypothesis import given, settings, strategies as st

from numpygpt import bpe
from numpygpt.tokenizer import get_tokenizer, merges_of, train_bpe

# A few kilobytes of the default corpus (Python's manual), with some non-ASCII text
# and a document boundary, so merges of multi-byte characters are learned too.
SMALL_TEXT = (pydoc_data.topics.topics["if"][:3000] + "<|endoftext|>"
              + "naïve café déjà vu, 日本語の日本語, naïve again  \n\n" * 5
              + pydoc_data.topics.topics["while"][:2000])


def test_hand_computed_merges():
    # "aaabdaaabac" is one word. Pair counts: aa 4, ab 2, others 1 -> merge a+a, which
    # leaves [aa a b d aa a b a c]; aa+a and a+b tie at 2 and a+b has the smaller ids
    # (64, 65) against (256, 64); then aa+ab (2); then every pair has 1 and a+c has
    # the smallest ids.
    expected = [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab"), (b"a", b"c")]
    assert bpe.train("aaabdaaabac", 257 + 4) == expected
    assert merges_of(train_bpe("aaabdaaabac", 257 + 4)) == expected


def test_same_merges_as_the_fast_trainer():
    merges = bpe.train(SMALL_TEXT, 500)
    assert len(merges) == 500 - 257
    assert merges == merges_of(train_bpe(SMALL_TEXT, 500))


def test_same_ids_as_the_fast_tokenizer():
    fast = train_bpe(SMALL_TEXT, 500)
    merges = merges_of(fast)
    text = SMALL_TEXT.replace("<|endoftext|>", "") + " unseen wörds 123 😀"
    ids = bpe.encode(text, merges)
    assert ids == fast.encode_ordinary(text)
    assert len(ids) < len(text.encode("utf-8")) / 2  # merges do compress
    assert bpe.decode(ids, merges) == text


def test_byte_order_is_gpt2s():
    gpt2 = get_tokenizer()
    assert [gpt2.decode_single_token_bytes(i) for i in range(256)] == [bytes([b]) for b in bpe.byte_order()]
    assert sorted(bpe.byte_order()) == list(range(256))
    # the printable stand-ins sort in id order, which is how the fast trainer orders bytes
    chars = [bpe.byte_to_unicode()[b] for b in bpe.byte_order()]
    assert chars == sorted(chars) and all(c.isprintable() and not c.isspace() for c in chars)


def test_a_merge_that_remakes_a_token_reuses_its_id():
    merges = [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"a", b"bc")]
    vocab = bpe.vocabulary(merges)
    assert vocab[256:] == [b"ab", b"bc", b"abc"]
    assert bpe.encode("abc", merges) == [258]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_same_pre_tokenisation_as_the_fast_tokenizer(text):
    pre = train_bpe("a b", 258).hf_tokenizer.pre_tokenizer
    decoder = {c: b for b, c in bpe.byte_to_unicode().items()}
    pieces = [bytes(decoder[c] for c in piece).decode("utf-8") for piece, _ in pre.pre_tokenize_str(text)]
    assert pieces == bpe.WORD_PATTERN.findall(text)
