"""The classification data pipeline on hand-made files: reading (TSV and CSV), label ids,
balancing, the 70/10/20 split (checked against pandas, which the book uses), padding,
and a clear error for every kind of bad file."""

import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest

from numpygpt.finetune import classify_data
from numpygpt.finetune.classify_data import (ClassificationDataset, balance, download_sms_spam, label_names,
                                             prepare_classification_data, read_labelled_texts, split_indices)
from numpygpt.tokenizer import get_tokenizer


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


# -- reading -------------------------------------------------------------------------------------

def test_reads_tab_separated_lines_with_header_blank_lines_and_crlf(tmp_path):
    path = write(tmp_path, "sms.txt", "Label\tText\r\nham\tHello there \r\n\r\nspam\tWIN a prize\tnow\n\nham\tok\n")
    data = read_labelled_texts(path)
    assert data.labels == ["ham", "spam", "ham"]
    # the text keeps its own spaces and any further tab; only the line ending goes
    assert data.texts == ["Hello there ", "WIN a prize\tnow", "ok"]
    assert data.where[1] == f"{path} line 4"


def test_reads_quoted_texts_as_the_books_pandas_reader_does(tmp_path):
    """pd.read_csv(sep="\t", header=None) quotes a field that begins with a double quote:
    up to the next lone quote it is all text (tabs and line breaks too), "" is one quote,
    and what follows the closing quote joins the field. Expected rows written by those
    rules (a quote inside a field is plain text; the fourth line's quote swallows two lines)."""
    content = ('ham\tsaid "hi" to me\n'              # line 1: quotes inside: plain characters
               'ham\t"Quoted, with ""doubled"" quotes"\n'  # line 2
               'spam\t"Call now" and win\r\n'       # line 3: text after the closing quote joins
               'ham\t"Opens a quote\n'               # line 4: never closed on its line...
               'spam\tthis line is text\n'           # line 5 ...so this line is inside it
               'ham\tcloses" here\n'                 # line 6 ...up to here
               '\n'
               'spam\tlast one\n')                   # line 8
    data = read_labelled_texts(write(tmp_path, "SMSSpamCollection", content))
    assert data.labels == ["ham", "ham", "spam", "ham", "spam"]
    assert data.texts == ['said "hi" to me', 'Quoted, with "doubled" quotes', "Call now and win",
                          "Opens a quote\nspam\tthis line is text\nham\tcloses here", "last one"]
    assert [w.rsplit(" ", 1)[1] for w in data.where] == ["1", "2", "3", "4", "8"]


def test_a_quote_never_closed_names_its_line(tmp_path):
    with pytest.raises(ValueError, match=r"line 2: a text that begins with a quote .* never closed"):
        read_labelled_texts(write(tmp_path, "sms.tsv", 'ham\thi\nham\t"unclosed\nspam\twin\n'))


def test_reads_the_books_csv_and_named_columns(tmp_path):
    path = write(tmp_path, "train.csv", 'Label,Text\n0,"Hi, how are you"\n1,"Free entry, ""now"""\n')
    data = read_labelled_texts(path)
    assert data.labels == ["0", "1"] and data.texts == ["Hi, how are you", 'Free entry, "now"']
    other = write(tmp_path, "other.csv", "Category,Message\nspam,win\nham,hi\n")
    data = read_labelled_texts(other, label_column="Category", text_column="Message")
    assert data.labels == ["spam", "ham"] and data.texts == ["win", "hi"]


@pytest.mark.parametrize("content, message", [
    ("", "holds no examples"),
    ("\n\n  \n", "holds no examples"),
    ("Label,Text\n", "holds no examples"),
    ("Category,Message\nspam,win\n", "no label column 'Label'"),
    ("Label,Message\nspam,win\n", "no text column 'Text'"),
])
def test_unreadable_files_say_why(tmp_path, content, message):
    path = write(tmp_path, "data.csv", content)
    with pytest.raises(ValueError, match=message):
        read_labelled_texts(path)


def test_unknown_label_column_names_the_columns(tmp_path):
    path = write(tmp_path, "data.csv", "Label,Text\nham,hi\n")
    with pytest.raises(ValueError, match=r"no label column 'Class' \(its columns: 'Label', 'Text'\)"):
        read_labelled_texts(path, label_column="Class")


@pytest.mark.parametrize("content, message", [
    ("ham\thi\nspam no tab here\n", "line 2: no tab"),
    ("ham\thi\n\tno label\n", "line 2: the label is empty"),
    ("ham\thi\nspam\t   \n", "line 2: the text is empty"),
])
def test_bad_lines_name_their_line(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        read_labelled_texts(write(tmp_path, "sms.tsv", content))


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_labelled_texts(tmp_path / "nope.txt")
    path = tmp_path / "latin1.txt"
    path.write_bytes("ham\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_labelled_texts(path)


# -- labels ----------------------------------------------------------------------------------------

def test_label_names():
    assert label_names(["spam", "ham", "ham"]) == ["ham", "spam"]
    assert label_names(["b", "c", "a", "b"]) == ["a", "b", "c"]
    assert label_names(["10", "2", "1"]) == ["1", "2", "10"]  # integers sort as numbers
    with pytest.raises(ValueError, match="every example has the label 'ham'.*at least two classes"):
        label_names(["ham", "ham"])


# -- balancing and splitting --------------------------------------------------------------------------

def test_balance_undersamples_every_class_to_the_smallest():
    ids = np.array([0] * 20 + [1] * 5 + [2] * 7)
    rows = balance(ids, seed=123)
    assert np.bincount(ids[rows]).tolist() == [5, 5, 5]
    assert len(set(rows.tolist())) == 15  # without replacement
    assert rows[5:10].tolist() == [20, 21, 22, 23, 24]  # the smallest class keeps its rows, in order
    assert balance(ids, seed=123).tolist() == rows.tolist()  # seeded
    assert balance(ids, seed=1).tolist() != rows.tolist()
    with pytest.raises(ValueError, match="two classes"):
        balance([1, 1, 1])


def test_split_sizes_are_the_books():
    # the book's balanced SMS data: 747 ham + 747 spam -> 1045 / 149 / 300
    train, val, test = split_indices(1494)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(1494))


def test_balance_and_split_draw_as_the_books_pandas_code(tmp_path):
    # 60 messages, every 8th from the 4th on spam (52 ham, 8 spam). The expected lists were
    # computed with pandas 2.3.3 running the book's code:
    #   concat([ham.sample(8, random_state=123), spam]).sample(frac=1, random_state=123)
    #   then rows [:int(0.7 n)], [.. + int(0.1 n)], the rest
    lines = [f"{'spam' if i % 8 == 3 else 'ham'}\tmessage {i}" for i in range(60)]
    path = write(tmp_path, "sms.txt", "\n".join(lines) + "\n")
    data = prepare_classification_data(path, batch_size=2)
    tok = get_tokenizer()

    def numbers(ds):
        texts = [tok.decode([t for t in row if t != 50256]) for row in ds.inputs]
        return [int(text.split()[1]) for text in texts]

    assert numbers(data.train) == [15, 19, 21, 55, 13, 11, 3, 27, 28, 40, 24]
    assert numbers(data.val) == [59]
    assert numbers(data.test) == [35, 34, 43, 51]
    assert data.label_names == ["ham", "spam"] and data.class_counts == {"ham": 52, "spam": 8}
    assert data.train.labels.tolist() == [int(n % 8 == 3) for n in numbers(data.train)]


# -- tokenising and padding ------------------------------------------------------------------------------

def test_training_texts_pad_to_the_longest_and_the_rest_truncate_to_it():
    tok = get_tokenizer()
    train = ClassificationDataset(["a b", "a b c d e", "a"], [0, 1, 0], tok)
    assert train.max_length == 5 and train.inputs.shape == (3, 5)
    assert train.inputs[0].tolist() == tok.encode("a b") + [50256] * 3
    assert train.labels.tolist() == [0, 1, 0] and train.inputs.dtype == np.int64
    test = ClassificationDataset(["a b c d e f g", "a"], [1, 0], tok, max_length=train.max_length)
    assert test.inputs.shape == (2, 5) and test.truncated == 1
    assert test.inputs[0].tolist() == tok.encode("a b c d e")
    inputs, labels = test.get_batch([1, 0])
    assert inputs.shape == (2, 5) and labels.tolist() == [0, 1]
    # "<|endoftext|>" inside a message is text, not the padding/special id
    assert 50256 not in ClassificationDataset(["x <|endoftext|>"], [0], tok).inputs


def test_a_text_longer_than_the_context_is_an_error_unless_truncated():
    texts = ["short", "one two three four five six seven"]
    with pytest.raises(ValueError, match=r"line 9 is 7 tokens long, longer than the model's context of 4.*--max-length"):
        ClassificationDataset(texts, [0, 1], context_length=4, where=["f line 1", "f line 9"])
    ds = ClassificationDataset(texts, [0, 1], context_length=4, max_length=4)
    assert ds.inputs.shape == (2, 4) and ds.truncated == 1
    with pytest.raises(ValueError, match="max_length 5 exceeds the model's context length 4"):
        ClassificationDataset(texts, [0, 1], context_length=4, max_length=5)


def test_loaders_batch_8_and_training_drops_the_last_partial_batch(tmp_path):
    lines = [f"{'spam' if i % 2 else 'ham'}\t{'word ' * (1 + i % 7)}{i}" for i in range(60)]
    data = prepare_classification_data(write(tmp_path, "d.txt", "\n".join(lines)))
    assert (len(data.train), len(data.val), len(data.test)) == (42, 6, 12)
    assert len(data.train_loader) == 5  # 42 // 8
    assert len(data.test_loader) == 2  # 8 + 4
    batches = list(data.train_loader.epoch_batches(0))
    assert all(x.shape == (8, data.train.max_length) and y.shape == (8,) for x, y in batches)
    assert data.val.max_length == data.test.max_length == data.train.max_length
    assert data.train.max_length == max(int((row != 50256).sum()) for row in data.train.inputs)


def test_too_few_examples_to_train(tmp_path):
    path = write(tmp_path, "d.txt", "ham\ta\nspam\tb\nham\tc\nspam\td\n")
    with pytest.raises(ValueError, match="too few examples: balanced to 2 per class"):
        prepare_classification_data(path)


def test_one_class_file(tmp_path):
    path = write(tmp_path, "d.txt", "ham\ta\nham\tb\n")
    with pytest.raises(ValueError, match="every example has the label 'ham'"):
        prepare_classification_data(path)


# -- the SMS Spam Collection download ------------------------------------------------------------------

def test_download_extracts_the_collection_once(tmp_path, monkeypatch):
    zip_path = tmp_path / "sms.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("readme", "about")
        z.writestr("SMSSpamCollection", "ham\thi\nspam\twin\n")
    monkeypatch.setattr(classify_data, "SMS_SPAM_URL", zip_path.as_uri())  # a file:// URL: no network
    path = download_sms_spam(cache_dir=tmp_path / "cache")
    assert Path(path).read_text() == "ham\thi\nspam\twin\n"
    zip_path.unlink()  # a second call reads the cache
    assert download_sms_spam(cache_dir=tmp_path / "cache") == path


def test_offline_download_says_what_to_pass(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("numpygpt.download.download_file", offline)
    with pytest.raises(OSError, match=r"could not be downloaded from https://archive\.ics\.uci\.edu.*--data PATH") as e:
        download_sms_spam(cache_dir=tmp_path)
    assert "\n" not in str(e.value)
