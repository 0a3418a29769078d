"""Data for `mftc-peft finetune`: the packaged Rotten Tomatoes split, or local CSV / JSONL files, validated.

Every problem with a user's file is a `DataError` whose message names the file (and the line where there is one), so
the command line can print it as one line. Labels are integers 0..K-1, or strings mapped to ids in sorted order; the
mapping comes from the training file, and an evaluation label that training never saw is an error.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# The packaged default: disjoint train / validation / test subsets from one seeded permutation of the corpus.
DEFAULT_SIZES = {"train": 2000, "validation": 250, "test": 1000}
HELD_OUT_SHARE = 0.2  # a train file without an eval file gives this share of its rows to the test split
# A train file also gives this share of its rows to the validation split (scored after every epoch), as the packaged
# default holds out 250 of its 2,250 training snippets. Files too small to spare a row train on all of them.
VALIDATION_SHARE = 0.1


class DataError(ValueError):
    """A user-facing problem with the data (file, line, column or label); the message is one line."""


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]

    def head(self, n: int | None) -> "Split":
        return self if n is None else Split(self.texts[:n], self.labels[:n])

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TaskData:
    """What a run trains and evaluates on; `label_names[i]` is the original value of label id i."""

    train: Split
    test: Split
    validation: Split | None
    label_names: list
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def check_training_classes(self) -> None:
        """The file check (`_check_two_classes`) sees every row; the split and `--max-train-samples` can still leave
        the training part with one class, and then the warm-up sees no gradient."""
        if len(set(self.train.labels)) < 2:
            raise DataError(
                f"{self.source}: the {len(self.train)} training rows left after holding out validation / test rows "
                f"(and --max-train-samples) are all of class {self.label_names[self.train.labels[0]]!r}; use more "
                "rows, a larger --max-train-samples or another --seed"
            )

    def capped(self, max_train: int | None, max_eval: int | None) -> "TaskData":
        """The first `max_train` training and `max_eval` test / validation examples (None: all)."""
        validation = self.validation.head(max_eval) if self.validation is not None else None
        return TaskData(self.train.head(max_train), self.test.head(max_eval), validation, self.label_names,
                        self.source)


# ------------------------------------------------------------------------------------------------------ packaged data
def packaged_data(seed: int) -> TaskData:
    """The packaged Rotten Tomatoes snippets (rotten = 0, fresh = 1), split by a permutation seeded with `seed`."""
    from ..assets import load_rotten_tomatoes

    corpus = load_rotten_tomatoes()
    order = np.random.default_rng(seed).permutation(len(corpus.texts))
    parts, start = {}, 0
    for name, size in DEFAULT_SIZES.items():
        rows = order[start : start + size]
        parts[name] = Split([corpus.texts[i] for i in rows], [corpus.labels[i] for i in rows])
        start += size
    return TaskData(parts["train"], parts["test"], parts["validation"], ["rotten", "fresh"], "rotten_tomatoes")


# ---------------------------------------------------------------------------------------------------------- files
def file_data(train_file: Path, eval_file: Path | None, *, text_column: str, label_column: str, seed: int) -> TaskData:
    """Rows of the user's files, split by one permutation seeded with `seed`: without `eval_file` a `HELD_OUT_SHARE`
    of the train file is the test split; a `VALIDATION_SHARE` of it is the validation split in either case."""
    train_rows = read_rows(train_file, text_column, label_column)
    mapping, names = label_mapping(train_rows, train_file)
    train = _encode(train_rows, mapping, train_file)
    if eval_file is None and len(train) < 2:
        raise DataError(f"file {train_file}: needs at least 2 rows to hold some out for testing (or pass --eval-file)")
    _check_two_classes(train, names, train_file, label_column)
    order = np.random.default_rng(seed).permutation(len(train))
    pick = lambda rows: Split([train.texts[i] for i in rows], [train.labels[i] for i in rows])  # noqa: E731
    n_test = 0 if eval_file is not None else max(1, int(round(HELD_OUT_SHARE * len(train))))
    n_validation = validation_size(len(train) - n_test)
    validation = pick(order[n_test : n_test + n_validation]) if n_validation else None
    rest = pick(order[n_test + n_validation :])
    if eval_file is not None:
        test = _encode(read_rows(eval_file, text_column, label_column), mapping, eval_file)
        return TaskData(rest, test, validation, names, f"{train_file} + {eval_file}")
    return TaskData(rest, pick(order[:n_test]), validation, names, str(train_file))


def validation_size(n_rows: int) -> int:
    """Rows of `n_rows` held out for validation: `VALIDATION_SHARE` of them, but at least one row keeps training."""
    return min(int(round(VALIDATION_SHARE * n_rows)), n_rows - 1)


def _check_two_classes(train: Split, names: list, path: Path, label_column: str) -> None:
    """One class leaves nothing to learn, and its one-label cross-entropy is 0: the warm-up would see no gradient."""
    if len(set(train.labels)) < 2:
        raise DataError(
            f"file {path}: every label in column {label_column!r} is {names[train.labels[0]]!r} (one class); a "
            "classifier needs at least 2 classes in the training data (check --label-column, or add examples of the "
            "other classes)"
        )


@dataclass(frozen=True)
class Row:
    line: int
    text: str
    label: object


def read_rows(path: Path, text_column: str, label_column: str) -> list[Row]:
    """The (text, raw label) rows of a CSV or JSONL file, with their line numbers; every row must have both."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file {path}: not found" if not path.exists() else f"file {path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        rows = _csv_rows(path, text_column, label_column)
    elif suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(path, text_column, label_column)
    else:
        raise DataError(f"file {path}: must end in .csv, .jsonl or .ndjson, got {suffix or 'no suffix'!r}")
    if not rows:
        raise DataError(f"file {path}: is empty (no data rows)")
    return rows


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, with or without a byte-order mark (spreadsheet programs write one)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"file {path}, line {line}: must be UTF-8 text, got byte {data[error.start]:#04x} (save the file as "
            "UTF-8, e.g. 'CSV UTF-8' in a spreadsheet program)"
        ) from None


def _csv_rows(path: Path, text_column: str, label_column: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        return _csv_records(path, reader, text_column, label_column)
    except csv.Error as error:  # e.g. a field over csv's limit of 131,072 characters
        # `line_num` counts the lines of the records read so far; the failing record starts on the next one.
        raise DataError(f"file {path}, line {reader.line_num + 1}: not valid CSV ({error})") from None


def _csv_records(path: Path, reader: csv.DictReader, text_column: str, label_column: str) -> list[Row]:
    columns = reader.fieldnames
    if not columns:
        raise DataError(f"file {path}: is empty (no header line)")
    for column, option in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in columns:
            raise DataError(
                f"file {path}: no column {column!r} (columns: {', '.join(columns)}); set {option}"
            )
    rows = []
    for record in reader:
        text, label = record.get(text_column), record.get(label_column)
        rows.append(_row(path, reader.line_num, text, None if label in (None, "") else label.strip()))
    return rows


def _jsonl_rows(path: Path, text_column: str, label_column: str) -> list[Row]:
    rows = []
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"file {path}, line {line_number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"file {path}, line {line_number}: must be a JSON object, got {record!r:.60}")
        for column, option in ((text_column, "--text-column"), (label_column, "--label-column")):
            if column not in record:
                raise DataError(
                    f"file {path}, line {line_number}: no column {column!r} (keys: {', '.join(record)}); "
                    f"set {option}"
                )
        rows.append(_row(path, line_number, record[text_column], record[label_column]))
    return rows


def _row(path: Path, line: int, text, label) -> Row:
    if label is None or (isinstance(label, str) and not label.strip()):
        raise DataError(f"file {path}, line {line}: the row has no label")
    if not isinstance(text, str):
        raise DataError(f"file {path}, line {line}: the text must be a string, got {text!r:.60}")
    return Row(line, text, label)


# --------------------------------------------------------------------------------------------------------- labels
def _as_integer(value):
    """The label as an int when it is one (5, 5.0, "5"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def label_mapping(rows: list[Row], path: Path) -> tuple[dict, list]:
    """(raw label -> id, names by id) from the training rows.

    All labels integers: they are the ids and must be 0..K-1 (K = the largest + 1). Otherwise all must be strings,
    numbered in sorted order. Mixed kinds, negative ids and other values (floats, lists, booleans) are errors.
    """
    as_ints = [_as_integer(row.label) for row in rows]
    for row, value in zip(rows, as_ints):
        if value is None and not isinstance(row.label, str):
            raise DataError(
                f"file {path}, line {row.line}: a label must be an integer 0..K-1 or a string, got {row.label!r}"
            )
        if value is not None and value < 0:
            raise DataError(f"file {path}, line {row.line}: integer labels must be 0..K-1, got {row.label!r}")
    if all(value is not None for value in as_ints):
        k = max(as_ints) + 1
        return {value: value for value in range(k)}, list(range(k))
    if any(value is not None for value in as_ints):
        first_int = next(row for row, value in zip(rows, as_ints) if value is not None)
        first_str = next(row for row, value in zip(rows, as_ints) if value is None)
        raise DataError(
            f"file {path}, line {first_int.line}: labels must be all integers or all strings, got {first_int.label!r} "
            f"here and {first_str.label!r} on line {first_str.line}"
        )
    names = sorted({row.label for row in rows})
    return {name: i for i, name in enumerate(names)}, names


def _encode(rows: list[Row], mapping: dict, path: Path) -> Split:
    integer = all(isinstance(key, int) for key in mapping)
    ids = []
    for row in rows:
        key = _as_integer(row.label) if integer else row.label
        if key is None or key not in mapping:
            known = ", ".join(map(repr, list(mapping)[:10])) + (", ..." if len(mapping) > 10 else "")
            raise DataError(
                f"file {path}, line {row.line}: label {row.label!r} does not occur in the training data "
                f"(labels: {known})"
            )
        ids.append(mapping[key])
    return Split([row.text for row in rows], ids)
