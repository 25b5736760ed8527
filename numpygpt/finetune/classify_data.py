"""Labelled texts for classification fine-tuning: the book's chapter 6 data pipeline.

    data = prepare_classification_data("SMSSpamCollection", context_length=1024)
    data.label_names            # ['ham', 'spam']
    for inputs, labels in data.train_loader:   # (8, T) int64 token ids, (8,) int64 class ids
        ...

Each step is a function of its own, so it can be checked on hand-made data:

1. ``read_labelled_texts``: ``label<TAB>text`` lines (the SMS Spam Collection's own
   format), quoted as the book's pandas reader quotes them (a text that begins with
   ``"``), or a CSV file with ``Label`` and ``Text`` columns (the book's ``train.csv``).
2. ``label_names``: ``ham``/``spam`` are 0/1; any other labels are numbered in sorted
   order (numerically when every label is an integer).
3. ``balance``: every class undersampled to the smallest class's size (seed 123).
4. ``split_indices``: shuffled (seed 123) and split 70/10/20.
5. ``ClassificationDataset``: every text tokenised and right-padded with 50256 to the
   longest training text; validation and test texts truncated or padded to that length.

Steps 3 and 4 draw exactly as the book's pandas code does (``df.sample(k,
random_state=123)`` is ``RandomState(123).permutation(n)[:k]``), so the same rows in the
same order give the book's split.
"""

from __future__ import annotations

import csv
import io
import os
import re
import zipfile
from dataclasses import dataclass, field
from urllib.error import URLError

import numpy as np

from ..data import DataLoader
from ..tokenizer import EOT_ID, get_tokenizer

__all__ = [
    "LabelledTexts", "read_labelled_texts", "label_names", "balance", "split_indices",
    "ClassificationDataset", "ClassificationData", "prepare_classification_data",
    "download_sms_spam", "SMS_SPAM_URL", "SMS_SPAM_FILE", "PAD_ID",
]

PAD_ID = EOT_ID  # <|endoftext|> pads, as in the book
SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_FILE = "SMSSpamCollection"  # the member of that zip holding label<TAB>text lines


# -- 1. reading ----------------------------------------------------------------------------

@dataclass
class LabelledTexts:
    """Parallel lists: ``texts[i]`` has label ``labels[i]`` and came from ``where[i]``
    (``"FILE line N"``, for error messages)."""

    texts: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    where: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def read_labelled_texts(path, label_column: str | None = None, text_column: str | None = None,
                        fmt: str = "auto") -> LabelledTexts:
    """Read ``label<TAB>text`` lines or a CSV with a label and a text column.

    fmt: "tsv", "csv", or "auto": CSV for a ``.csv`` file or one whose first line has no
    tab, otherwise tab-separated. Blank lines are skipped; a first tab-separated line
    whose label is ``label`` (any case) is a header and skipped too. CSV columns default
    to ``Label`` and ``Text`` (the book's files). Raises ValueError naming the file and
    line of anything it cannot read (a line without a tab, an empty label or text, a
    missing column, no examples at all).
    """
    path = os.fspath(path)
    if fmt not in ("auto", "tsv", "csv"):
        raise ValueError(f"fmt must be 'auto', 'tsv' or 'csv', got {fmt!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist (or is not a file)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    first = next((line for line in content.splitlines() if line.strip()), "")
    if fmt == "auto":
        fmt = "csv" if path.lower().endswith(".csv") or (first and "\t" not in first) else "tsv"
    if fmt == "tsv" and (label_column is not None or text_column is not None):
        raise ValueError(f"{path} is read as label<TAB>text lines: label and text columns apply to CSV files only")
    data = _read_csv(path, content, label_column or "Label", text_column or "Text") if fmt == "csv" \
        else _read_tsv(path, content)
    if len(data) == 0:
        raise ValueError(f"{path} holds no examples: expected label<TAB>text lines or a CSV with "
                         f"{label_column or 'Label'},{text_column or 'Text'} columns")
    return data


def _read_tsv(path: str, content: str) -> LabelledTexts:
    data = LabelledTexts()
    for line, fields in _tsv_records(path, content):
        if not "".join(fields).strip():
            continue  # a blank line
        if len(fields) < 2:
            raise ValueError(f"{path} line {line}: no tab; expected label<TAB>text (or a CSV file with Label,Text columns)")
        label, text = fields[0].strip(), "\t".join(fields[1:])  # a further tab stays in the text
        if not data.texts and label.lower() == "label":
            continue  # a header line
        _add(data, label, text, f"{path} line {line}")
    return data


_FIELD_END = re.compile(r"[\t\n]")


def _tsv_records(path: str, content: str):
    """(line the record starts on, its fields) for every record of tab-separated ``content``,
    quoted as the book's reader, pandas' ``read_csv(sep="\t")``, quotes them (its defaults,
    the quoting of Python's csv module):

    - a field that *begins* with ``"`` is quoted: up to the next lone ``"`` everything is
      text, tabs and line breaks included (so one record can span lines), and ``""`` is
      one ``"``; whatever follows the closing quote up to the tab or line end is appended;
    - a ``"`` anywhere else in a field is an ordinary character.

    So ``ham<TAB>"Hi" there`` is the text ``Hi there``, and a message that opens a quote
    it never closes on its line takes the lines after it into its text, as pandas does:
    that is why the book counts 4825 ham messages in a file of 4827 ham lines. A quote
    still open at the end of the file is an error (pandas: "EOF inside string").
    """
    pos, line, n = 0, 1, len(content)
    while pos < n:
        start, fields, sep = line, [], "\t"
        while sep == "\t":
            value, pos, sep = _tsv_field(path, content, pos, line)
            line += value.count("\n") + (sep == "\n")
            fields.append(value)
        yield start, fields


def _tsv_field(path: str, content: str, pos: int, line: int):
    """(the field at ``pos``, where the next one starts, the character that ended it:
    tab, line break, or "" at the end of the content)."""
    parts = []
    if content.startswith('"', pos):
        i = pos + 1
        while True:
            close = content.find('"', i)
            if close < 0:
                raise ValueError(f"{path} line {line}: a text that begins with a quote (\") is never closed; the "
                                 "book's reader (pandas) quotes such texts too: double the quotes inside it, close "
                                 "it, or write the data as a CSV file")
            parts.append(content[i:close])
            if not content.startswith('"', close + 1):
                break
            parts.append('"')  # "" inside quotes is one quote
            i = close + 2
        pos = close + 1
    end = _FIELD_END.search(content, pos)
    end = end.start() if end else len(content)
    tail = content[pos:end]
    sep = content[end:end + 1]
    if sep != "\t" and tail.endswith("\r"):
        tail = tail[:-1]  # a CRLF line ending
    parts.append(tail)
    return "".join(parts), end + 1, sep


def _read_csv(path: str, content: str, label_column: str, text_column: str) -> LabelledTexts:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    columns = reader.fieldnames or []
    data = LabelledTexts()
    if not columns:
        return data
    for name, what in ((label_column, "label"), (text_column, "text")):
        if name not in columns:
            raise ValueError(f"{path} has no {what} column {name!r} (its columns: {', '.join(map(repr, columns))}); "
                             f"name the {what} column with --{what}-column (or pass label<TAB>text lines)")
    for row in reader:
        _add(data, (row[label_column] or "").strip(), row[text_column] or "", f"{path} line {reader.line_num}")
    return data


def _add(data: LabelledTexts, label: str, text: str, where: str) -> None:
    if not label:
        raise ValueError(f"{where}: the label is empty")
    if not text.strip():
        raise ValueError(f"{where}: the text is empty")
    data.texts.append(text)
    data.labels.append(label)
    data.where.append(where)


# -- 2. labels -----------------------------------------------------------------------------

def label_names(labels, source: str = "the data") -> list:
    """The class names in class-id order: ['ham', 'spam'] for the SMS Spam Collection,
    otherwise the distinct labels sorted (as integers when they all are integers)."""
    distinct = set(labels)
    if len(distinct) < 2:
        only = f"the label {next(iter(distinct))!r}" if distinct else "no label"
        raise ValueError(f"{source}: every example has {only}; a classifier needs examples of at least two classes")
    if distinct == {"ham", "spam"}:
        return ["ham", "spam"]
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


# -- 3. and 4. balancing and splitting -----------------------------------------------------

def balance(class_ids, seed: int = 123) -> np.ndarray:
    """Row indices of a balanced subset: every class undersampled to the smallest class's size.

    Classes come in class-id order; a class larger than the smallest is sampled without
    replacement by ``RandomState(seed)`` (pandas' ``sample(k, random_state=seed)``), a
    class of the smallest size keeps its rows in order. For the SMS data (ham the
    majority, id 0) this is the book's ``concat([ham.sample(n_spam, 123), spam])``.
    """
    class_ids = np.asarray(class_ids)
    if class_ids.ndim != 1:
        raise ValueError(f"class_ids must be 1-D, got shape {class_ids.shape}")
    classes = np.unique(class_ids)
    if len(classes) < 2:
        raise ValueError("balance needs examples of at least two classes")
    rows = [np.flatnonzero(class_ids == c) for c in classes]
    smallest = min(len(r) for r in rows)
    picked = []
    for r in rows:
        if len(r) > smallest:
            r = r[np.random.RandomState(seed).permutation(len(r))[:smallest]]
        picked.append(r)
    return np.concatenate(picked)


def split_indices(n: int, train_frac: float = 0.7, val_frac: float = 0.1, seed: int = 123):
    """(train, validation, test) positions of a shuffled range(n), as the book's random_split:
    shuffled by ``RandomState(seed)``, then the first int(0.7 n), the next int(0.1 n), the rest."""
    if not (0.0 < train_frac and 0.0 <= val_frac and train_frac + val_frac <= 1.0):
        raise ValueError(f"need 0 < train_frac, 0 <= val_frac and train_frac + val_frac <= 1; "
                         f"got {train_frac} and {val_frac}")
    order = np.random.RandomState(seed).permutation(int(n))
    train_end = int(n * train_frac)
    val_end = train_end + int(n * val_frac)
    return order[:train_end], order[train_end:val_end], order[val_end:]


# -- 5. tokenising and padding ---------------------------------------------------------------

class ClassificationDataset:
    """Texts as token ids, right-padded with ``pad_id`` to one length, and their class ids.

    ``max_length=None``: the longest text's length (the training set); a given
    ``max_length`` truncates longer texts (validation and test take the training set's).
    ``context_length``: the model's; a text longer than it, with no ``max_length`` to
    truncate to, is an error naming the text (pass ``max_length`` to truncate instead).

    ``dataset[i]`` is ``(ids (T,), label ())``; ``get_batch(indices)`` gives
    ``(inputs (B, T), labels (B,))``, int64, for ``numpygpt.data.DataLoader``.
    """

    def __init__(self, texts, labels, tokenizer=None, max_length: int | None = None,
                 pad_id: int = PAD_ID, context_length: int | None = None, where=None):
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if len(texts) == 0:
            raise ValueError("a classification dataset needs at least one text")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if max_length is not None and context_length is not None and max_length > context_length:
            raise ValueError(f"max_length {max_length} exceeds the model's context length {context_length}")
        tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        # encode_ordinary: a literal "<|endoftext|>" in a message is text, not the special token
        encoded = [tokenizer.encode_ordinary(text) for text in texts]
        lengths = [len(ids) for ids in encoded]
        if max_length is None:
            longest = int(np.argmax(lengths))
            max_length = lengths[longest]
            if context_length is not None and max_length > context_length:
                name = where[longest] if where is not None else f"text {longest}"
                raise ValueError(f"{name} is {max_length} tokens long, longer than the model's context of "
                                 f"{context_length} tokens; truncate the texts with --max-length N "
                                 f"(max_length=N), N <= {context_length}")
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.inputs = np.full((len(encoded), self.max_length), self.pad_id, dtype=np.int64)  # (N, T)
        for i, ids in enumerate(encoded):
            ids = ids[:self.max_length]
            self.inputs[i, :len(ids)] = ids
        self.labels = np.asarray(labels, dtype=np.int64)  # (N,)
        self.truncated = sum(n > self.max_length for n in lengths)  # how many texts lost tokens

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.inputs[i], self.labels[i]

    def get_batch(self, indices):
        indices = np.asarray(indices, dtype=np.int64)  # (B,)
        return self.inputs[indices], self.labels[indices]  # (B, T), (B,)


# -- all of it ------------------------------------------------------------------------------

@dataclass
class ClassificationData:
    """What ``prepare_classification_data`` builds: datasets, loaders and the counts it printed."""

    label_names: list
    train: ClassificationDataset
    val: ClassificationDataset
    test: ClassificationDataset
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    class_counts: dict  # label -> examples in the file
    balanced_per_class: int  # examples of each class after balancing


def prepare_classification_data(path, context_length: int | None = None, tokenizer=None,
                                max_length: int | None = None, batch_size: int = 8, seed: int = 123,
                                label_column: str | None = None, text_column: str | None = None,
                                pad_id: int = PAD_ID, fmt: str = "auto") -> ClassificationData:
    """Read, balance, shuffle, split 70/10/20, tokenise and pad ``path``, and batch it:
    the training loader shuffles (seeded) and drops the last partial batch; validation and
    test keep every example, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = read_labelled_texts(path, label_column, text_column, fmt)
    names = label_names(data.labels, source=os.fspath(path))
    class_of = {name: i for i, name in enumerate(names)}
    class_ids = np.array([class_of[label] for label in data.labels], dtype=np.int64)
    counts = {name: int((class_ids == i).sum()) for i, name in enumerate(names)}

    rows = balance(class_ids, seed)
    train_pos, val_pos, test_pos = split_indices(len(rows), seed=seed)
    per_class = min(counts.values())
    if len(train_pos) < batch_size or len(val_pos) == 0 or len(test_pos) == 0:
        raise ValueError(
            f"{os.fspath(path)}: too few examples: balanced to {per_class} per class ({len(rows)} in all), the "
            f"70/10/20 split has {len(train_pos)} training, {len(val_pos)} validation and {len(test_pos)} "
            f"test examples; need at least one batch ({batch_size}) to train on and one example to validate and test")
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()

    def dataset(positions, length):
        picked = rows[positions]
        return ClassificationDataset([data.texts[i] for i in picked], class_ids[picked], tokenizer,
                                     max_length=length, pad_id=pad_id, context_length=context_length,
                                     where=[data.where[i] for i in picked])

    train = dataset(train_pos, max_length)
    val = dataset(val_pos, train.max_length)
    test = dataset(test_pos, train.max_length)
    return ClassificationData(
        label_names=names, train=train, val=val, test=test,
        train_loader=DataLoader(train, batch_size, shuffle=True, drop_last=True, seed=seed),
        val_loader=DataLoader(val, batch_size, shuffle=False, drop_last=False),
        test_loader=DataLoader(test, batch_size, shuffle=False, drop_last=False),
        class_counts=counts, balanced_per_class=per_class,
    )


# -- the SMS Spam Collection -----------------------------------------------------------------

def download_sms_spam(cache_dir=None) -> str:
    """Path of the SMS Spam Collection (``SMSSpamCollection``, label<TAB>text lines),
    downloaded once from the UCI repository into ``<cache>/sms_spam_collection``.

    ``<cache>`` is ``cache_dir``, else $NUMPYGPT_CACHE, else ~/.cache/numpygpt. Offline, an
    OSError says what to pass instead.
    """
    from .. import download  # looked up at call time, so tests can fake the network
    from ..fileio import atomic_write

    directory = os.path.join(os.fspath(cache_dir) if cache_dir is not None else download.default_cache_dir(),
                             "sms_spam_collection")
    path = os.path.join(directory, SMS_SPAM_FILE)
    if os.path.isfile(path):
        return path
    zip_path = os.path.join(directory, "sms_spam_collection.zip")
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.path.isfile(zip_path):
            download.download_file(SMS_SPAM_URL, zip_path, verify=_check_sms_zip)
        with zipfile.ZipFile(zip_path) as z, atomic_write(path) as fh:
            fh.write(z.read(SMS_SPAM_FILE))
    except (URLError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        reason = " ".join(str(e).split())
        raise OSError(f"no data given, and the SMS Spam Collection could not be downloaded from {SMS_SPAM_URL} "
                      f"({type(e).__name__}: {reason}); pass a label<TAB>text file or a Label,Text CSV "
                      f"with --data PATH (data=PATH), e.g. the {SMS_SPAM_FILE} file from that zip") from e
    return path


def _check_sms_zip(path: str) -> None:
    with zipfile.ZipFile(path) as z:
        if SMS_SPAM_FILE not in z.namelist():
            raise ValueError(f"the downloaded zip holds no {SMS_SPAM_FILE} (it has {z.namelist()})")
