"""Sliding-window dataset and loader, checked against naive Python slicing."""

import numpy as np
import pytest

from numpygpt.data import (
    DataLoader,
    GPTDataset,
    create_dataloader,
    default_corpus,
    load_text,
    split_train_val,
)
from numpygpt.tokenizer import text_to_token_ids

SHORT_TEXT = (
    "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow "
    "enough--so it was no great surprise to me to hear that, in the height of his "
    "glory, he had dropped his painting, married a rich widow, and established "
    "himself in a villa on the Riviera. "
) * 4


def naive_windows(ids, max_length, stride):
    """The book's loop, in plain Python lists: the reference the dataset must match."""
    ids = list(ids)
    inputs, targets = [], []
    for i in range(0, len(ids) - max_length, stride):
        inputs.append(ids[i : i + max_length])
        targets.append(ids[i + 1 : i + max_length + 1])
    return inputs, targets


# -- GPTDataset ---------------------------------------------------------------------

@pytest.mark.parametrize("n, max_length, stride", [
    (20, 4, 1), (20, 4, 4), (20, 4, 5), (21, 4, 4), (5, 4, 1), (100, 7, 3), (9, 8, 100),
])
def test_windows_match_naive_slicing(n, max_length, stride):
    ids = np.random.default_rng(n).integers(0, 50257, size=n)
    ds = GPTDataset(ids, max_length, stride)
    ref_inputs, ref_targets = naive_windows(ids, max_length, stride)
    assert len(ds) == len(ref_inputs)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == y.shape == (max_length,)
        assert x.dtype == y.dtype == np.int64
        assert x.tolist() == ref_inputs[i]
        assert y.tolist() == ref_targets[i]
    # the batched gather gives the same windows
    X, Y = ds.get_batch(np.arange(len(ds))[::-1])
    assert X.shape == Y.shape == (len(ds), max_length)
    assert X.tolist() == ref_inputs[::-1] and Y.tolist() == ref_targets[::-1]
    assert X.flags.c_contiguous and Y.flags.c_contiguous


def test_targets_are_inputs_shifted_on_a_real_text():
    ids = text_to_token_ids(SHORT_TEXT)
    ds = GPTDataset(ids, max_length=8, stride=8)
    for i in range(len(ds)):
        x, y = ds[i]
        assert (y[:-1] == x[1:]).all()
        assert (x == ids[i * 8 : i * 8 + 8]).all()
        assert y[-1] == ids[i * 8 + 8]


def test_stride_sets_the_overlap():
    ids = np.arange(100)
    x0, _ = GPTDataset(ids, 10, 10)[0]
    x1, _ = GPTDataset(ids, 10, 10)[1]
    assert x1[0] == x0[-1] + 1  # stride == max_length: windows tile, no overlap
    x0, _ = GPTDataset(ids, 10, 3)[0]
    x1, _ = GPTDataset(ids, 10, 3)[1]
    assert (x1[:7] == x0[3:]).all()  # stride 3: consecutive windows share 7 tokens
    assert len(GPTDataset(ids, 10, 1)) == 90
    assert len(GPTDataset(ids, 10, 10)) == 9  # the 10th would need token 100


def test_storage_is_compact_and_items_are_copies():
    ds = GPTDataset(np.arange(50, dtype=np.int64), 4, 2)
    assert ds.token_ids.dtype == np.int32
    x, _ = ds[0]
    x[:] = -1
    assert ds[0][0].tolist() == [0, 1, 2, 3]


def test_negative_and_out_of_range_index():
    ds = GPTDataset(np.arange(10), 3, 1)  # 7 windows
    assert ds[-1][0].tolist() == ds[6][0].tolist() == [6, 7, 8]
    with pytest.raises(IndexError):
        ds[7]
    with pytest.raises(IndexError):
        ds.get_batch([0, 7])


def test_too_short_text_says_how_many_tokens():
    with pytest.raises(ValueError, match=r"has 4 tokens.*needs at least 5"):
        GPTDataset(np.arange(4), max_length=4, stride=1)
    with pytest.raises(ValueError, match=r"has 3 tokens.*needs at least 257"):
        GPTDataset.from_text("Hello world!", max_length=256, stride=128)


def test_bad_token_arrays_are_rejected():
    with pytest.raises(ValueError):
        GPTDataset(np.arange(20).reshape(4, 5), 2, 1)
    with pytest.raises(TypeError):
        GPTDataset(np.linspace(0, 1, 20), 2, 1)
    with pytest.raises(ValueError):
        GPTDataset(np.array([1, 2, -3, 4, 5]), 2, 1)
    with pytest.raises(ValueError):
        GPTDataset(np.arange(20), 0, 1)


def test_from_text_tokenises_like_the_tokenizer():
    ds = GPTDataset.from_text(SHORT_TEXT, max_length=16, stride=16)
    assert (ds.token_ids == text_to_token_ids(SHORT_TEXT)).all()


# -- DataLoader ---------------------------------------------------------------------

def make_loader(n_windows=10, batch_size=3, **kw):
    ids = np.arange(n_windows + 4)  # max_length 4, stride 1: window i starts at token i
    return DataLoader(GPTDataset(ids, 4, 1), batch_size, **kw)


def window_starts(loader_or_batches):
    return [int(x[0]) for X, _ in loader_or_batches for x in X]


def test_batch_shapes_and_dtypes():
    loader = create_dataloader(SHORT_TEXT, batch_size=2, max_length=8, stride=4, seed=1)
    assert len(loader) > 1
    for X, Y in loader:
        assert X.shape == Y.shape == (2, 8)
        assert X.dtype == Y.dtype == np.int64
        assert isinstance(X, np.ndarray)
        assert (Y[:, :-1] == X[:, 1:]).all()


@pytest.mark.parametrize("drop_last, expected_sizes", [(True, [3, 3, 3]), (False, [3, 3, 3, 1])])
def test_drop_last(drop_last, expected_sizes):
    loader = make_loader(10, 3, drop_last=drop_last, shuffle=False)
    sizes = [X.shape[0] for X, _ in loader]
    assert sizes == expected_sizes
    assert len(loader) == len(expected_sizes)


def test_no_shuffle_is_in_order():
    assert window_starts(make_loader(10, 5, shuffle=False)) == list(range(10))


def test_every_window_once_per_epoch():
    loader = make_loader(10, 3, drop_last=False, shuffle=True)
    for _ in range(3):
        assert sorted(window_starts(loader)) == list(range(10))


def test_shuffle_is_reproducible_and_changes_each_epoch():
    a, b, c = (make_loader(50, 5, seed=s) for s in (7, 7, 8))
    a_epochs = [window_starts(a) for _ in range(3)]
    b_epochs = [window_starts(b) for _ in range(3)]
    assert a_epochs == b_epochs                 # same seed: same orders
    assert a_epochs[0] != a_epochs[1] != a_epochs[2]  # a new order each epoch
    assert window_starts(c) != a_epochs[0]      # another seed: another order
    assert a_epochs[0] != list(range(50))


def test_set_epoch_and_state_dict_resume_exactly():
    a = make_loader(50, 5, seed=3)
    epochs = [window_starts(a) for _ in range(4)]
    b = make_loader(50, 5, seed=3)
    b.set_epoch(2)
    assert window_starts(b) == epochs[2]
    # a loader saved after two epochs and restored elsewhere continues with epoch 2
    c = make_loader(50, 5, seed=3)
    for _ in range(2):
        list(c)
    d = make_loader(50, 5, seed=999)
    d.load_state_dict(c.state_dict())
    assert window_starts(d) == epochs[2]
    assert window_starts(d) == epochs[3]
    # resuming in the middle of an epoch: skip the batches already trained on
    assert window_starts(a.epoch_batches(1, start=4)) == epochs[1][20:]


def test_load_state_dict_rejects_another_dataset():
    state = make_loader(50, 5).state_dict()
    with pytest.raises(ValueError, match="n_windows"):
        make_loader(40, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(50, 4).load_state_dict(state)


def test_nested_iteration_is_independent():
    loader = make_loader(12, 3, shuffle=False)
    outer = []
    for X, _ in loader:
        outer.append(int(X[0, 0]))
        inner = [int(Xi[0, 0]) for Xi, _ in loader]  # e.g. a loss estimate mid-epoch
        assert inner == [0, 3, 6, 9]
    assert outer == [0, 3, 6, 9]


def test_too_few_windows_for_one_batch():
    assert len(make_loader(2, 3, drop_last=True)) == 0
    assert list(make_loader(2, 3, drop_last=True)) == []
    assert [X.shape[0] for X, _ in make_loader(2, 3, drop_last=False)] == [2]


def test_loader_works_with_any_pair_dataset():
    class Pairs:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.full(3, i), np.full(3, -i)

    X, Y = next(iter(DataLoader(Pairs(), 2, shuffle=False)))
    assert X.tolist() == [[0, 0, 0], [1, 1, 1]] and Y.tolist() == [[0, 0, 0], [-1, -1, -1]]


# -- splitting and corpora ----------------------------------------------------------

def test_split_text_by_characters():
    text = "abcdefghij"
    assert split_train_val(text, 0.9) == ("abcdefghi", "j")
    train, val = split_train_val(SHORT_TEXT)
    assert train + val == SHORT_TEXT
    assert len(train) == int(0.9 * len(SHORT_TEXT))


def test_split_ids():
    train, val = split_train_val(np.arange(100), train_ratio=0.75)
    assert train.tolist() == list(range(75)) and val.tolist() == list(range(75, 100))
    train, val = split_train_val([1, 2, 3, 4], 0.5)
    assert train.tolist() == [1, 2] and val.tolist() == [3, 4]
    with pytest.raises(ValueError):
        split_train_val("abc", 1.5)


def test_default_corpus_is_text_and_tokenisable():
    text = default_corpus()
    assert isinstance(text, str) and len(text) > 100_000
    assert text == default_corpus()  # deterministic
    ids = text_to_token_ids(text)
    assert len(ids) > 50_000
    train, val = split_train_val(text)
    loader = create_dataloader(val, batch_size=4, max_length=64, stride=64, shuffle=False,
                               drop_last=False)
    assert len(loader) > 0


def test_load_text(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("naïve ☕ text\n", encoding="utf-8")
    assert load_text(path) == "naïve ☕ text\n"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(tmp_path / "missing.txt")
