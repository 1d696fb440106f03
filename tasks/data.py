"""Loading and validating the train, validation and eval splits (TSV, CSV or JSONL) with clear, row-precise errors.

Who reads what: `train` is what every stage learns from; `validation` (a file, or a stratified slice of the train
file that no stage trains on) is what every choice is made on; `eval` is read only to report each variant's figures."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field

from .base import DataError, StrictModel

log = logging.getLogger("squeezeflow.data")

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class DataConfig(StrictModel):
    dir: Path | None = Field(
        None, description="Base directory for `train` and `eval` (relative paths resolve against it)."
    )
    train: Path = Field(description="Training split: a .tsv, .csv or .jsonl file with a header / keys.")
    eval: Path = Field(
        description="Evaluation split, same format: read only to report each variant's figures, never to choose."
    )
    validation: Path | None = Field(
        None,
        description="Validation split, same format, with labels: every choice (best epoch, fallback, champion) is made "
        "on it. None: a stratified slice of the train file (validation_fraction), which no stage trains on.",
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Without data.validation: the share of train set aside."
    )
    validation_max: int = Field(
        2000, ge=10, description="Without data.validation: at most this many train rows set aside."
    )
    validation_seed: int = Field(
        0,
        ge=0,
        description="Seed of that slice; apart from the recipe's seed, so runs with other seeds choose on the same "
        "rows.",
    )
    validation_overlap: Literal["allow", "exclude"] = Field(
        "allow",
        description="Without data.validation: exclude = the slice draws only whole rows (no word span of another "
        "train row) and every train row that is a word span of a held row leaves train, so no validation text is "
        "trained on, whole or in part; for train files that also hold their sentences' phrases (SST-2).",
    )
    format: Literal["auto", "tsv", "csv", "jsonl"] = Field(
        "auto", description="File format; auto = from the extension."
    )
    text_column: str = Field("text", description="Column (or JSON key) holding the input text.")
    label_column: str = Field("label", description="Column holding the class: an integer index or one of label_names.")
    label_names: list[str] | None = Field(None, description="Class names in index order (optional).")
    train_has_labels: bool = Field(
        True, description="False: the train split is unlabelled (students learn from the teacher's soft labels alone)."
    )

    def path_of(self, split: Literal["train", "validation", "eval"]) -> Path:
        path = getattr(self, split)
        return path if self.dir is None or path.is_absolute() else self.dir / path


@dataclass(frozen=True)
class Split:
    path: Path
    texts: list[str]
    labels: list[int] | None  # None: an unlabelled train split

    def __len__(self) -> int:
        return len(self.texts)


def _rows(path: Path, fmt: str):
    """Yields (line_number, dict) for each record; line numbers count the header as line 1."""
    with path.open(encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}, line {line_no}: expected a JSON object, got {type(record).__name__}")
                yield line_no, record
            return
        if fmt == "tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            line_no = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}, row {line_no}: expected {len(header)} {fmt.upper()} columns "
                    f"({', '.join(header)}), found {len(row)}"
                )
            yield line_no, dict(zip(header, row))


def _columns(path: Path, fmt: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for line in f:
                if line.strip():
                    try:
                        first = json.loads(line)
                    except json.JSONDecodeError:
                        return []
                    return list(first) if isinstance(first, dict) else []
            return []
        first_line = f.readline()
    return next(csv.reader([first_line], delimiter="\t" if fmt == "tsv" else ","), [])


def _parse_label(raw, names: list[str] | None, num_labels: int, where: str) -> int:
    if isinstance(raw, str):
        text = raw.strip()
        if names and text in names:
            return names.index(text)
        try:
            value = int(text)
        except ValueError:
            expected = f"an integer in 0..{num_labels - 1}" + (f" or one of {names}" if names else "")
            raise DataError(f"{where}: expected {expected}, got {raw!r}") from None
    elif isinstance(raw, bool) or not isinstance(raw, int):
        raise DataError(f"{where}: expected an integer in 0..{num_labels - 1}, got {raw!r}")
    else:
        value = raw
    if not 0 <= value < num_labels:
        raise DataError(
            f"{where}: label {value} is out of range, expected 0..{num_labels - 1} (model.num_labels={num_labels})"
        )
    return value


def read_split(cfg: DataConfig, split: Literal["train", "validation", "eval"], num_labels: int) -> Split:
    path = cfg.path_of(split)
    try:
        return _read_split(cfg, split, num_labels, path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed {path.suffix.lstrip('.').upper() or 'data'} file ({e})") from None


def _read_split(cfg: DataConfig, split: Literal["train", "validation", "eval"], num_labels: int, path: Path) -> Split:
    if not path.is_file():
        raise DataError(f"data.{split}: file not found: {path}")
    fmt = cfg.format if cfg.format != "auto" else FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"data.{split}: cannot tell the format of {path} from its extension; set data.format to tsv, csv or jsonl"
        )
    labelled = split != "train" or cfg.train_has_labels
    columns = _columns(path, fmt)
    for column in (cfg.text_column, cfg.label_column) if labelled else (cfg.text_column,):
        if columns and column not in columns:
            raise DataError(
                f"{path}: missing column {column!r} (found: {', '.join(columns)}); set "
                f"data.{'text' if column == cfg.text_column else 'label'}_column"
            )
    texts: list[str] = []
    labels: list[int] = []
    for line_no, record in _rows(path, fmt):
        where = f"{path}, row {line_no}"
        for column in (cfg.text_column, cfg.label_column) if labelled else (cfg.text_column,):
            if column not in record:
                raise DataError(f"{where}: missing column {column!r}")
        text = record[cfg.text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}, column {cfg.text_column!r}: expected non-empty text, got {text!r}")
        texts.append(text)
        if labelled:
            labels.append(
                _parse_label(
                    record[cfg.label_column], cfg.label_names, num_labels, f"{where}, column {cfg.label_column!r}"
                )
            )
    if not texts:
        raise DataError(f"data.{split}: {path} holds no examples")
    return Split(path=path, texts=texts, labels=labels if labelled else None)


@dataclass(frozen=True)
class Splits:
    train: Split  # without the rows set aside for validation
    validation: Split
    eval: Split


def validation_rows(
    labels: list[int] | None, n: int, cfg: DataConfig, candidates: list[int] | None = None
) -> list[int]:
    """The train rows set aside for validation: `validation_fraction` of each class (stratified; of all rows when
    unlabelled), at most `validation_max` in all and at least one per class, drawn with `validation_seed` from
    `candidates` (default: every row)."""
    rng = random.Random(cfg.validation_seed)
    pool = list(range(n)) if candidates is None else candidates
    total = min(cfg.validation_max, len(pool), max(1, round(n * cfg.validation_fraction)))
    if labels is None:
        return sorted(rng.sample(pool, total))
    by_class: dict[int, list[int]] = {}
    for i in pool:
        by_class.setdefault(labels[i], []).append(i)
    chosen = []
    for label in sorted(by_class):
        rows = by_class[label]
        take = min(len(rows) - 1, max(1, round(total * len(rows) / len(pool))))  # every class keeps a training row
        chosen += rng.sample(rows, take)
    return sorted(chosen)


SPAN_WORDS = 64  # spans are quadratic in a row's words: a row longer than this counts as whole


def _spans(words: tuple[str, ...], proper: bool) -> Iterator[int]:
    """Hashes of a row's contiguous word spans (proper: shorter than the row), of at most SPAN_WORDS words."""
    longest = min(len(words) - 1 if proper else len(words), SPAN_WORDS)
    for length in range(1, longest + 1):
        for start in range(len(words) - length + 1):
            yield hash(words[start : start + length])


@functools.lru_cache(maxsize=4)  # every stage re-reads the splits; the span index costs seconds on 67k rows
def _held_apart(texts: tuple[str, ...], labels: tuple[int, ...] | None, cfg_json: str) -> tuple[list[int], set[int]]:
    """validation_overlap=exclude: the held rows (whole rows only) and the train rows that are word spans of them."""
    cfg = DataConfig.model_validate_json(cfg_json)
    words = [tuple(t.split()) for t in texts]
    inside: set[int] = set()
    for row in words:
        inside.update(_spans(row, proper=True))
    whole = [i for i, row in enumerate(words) if hash(row) not in inside]
    if labels is not None:
        classes = set(labels)
        short = sorted(c for c in classes if sum(labels[i] == c for i in whole) < 2)
        if short:
            raise DataError(
                f"data.validation_overlap: exclude needs two whole rows (no word span of another row) of every class; "
                f"classes {short} have fewer. Set data.validation to a file, or validation_overlap: allow"
            )
    held = validation_rows(None if labels is None else list(labels), len(texts), cfg, whole)
    held_spans: set[int] = set()
    for i in held:
        held_spans.update(_spans(words[i], proper=False))
    held_set = set(held)
    return held, {i for i, row in enumerate(words) if i not in held_set and hash(row) in held_spans}


def _subset(split: Split, rows: list[int]) -> Split:
    return Split(
        path=split.path,
        texts=[split.texts[i] for i in rows],
        labels=None if split.labels is None else [split.labels[i] for i in rows],
    )


def load_splits(cfg: DataConfig, num_labels: int) -> Splits:
    """Reads and checks the splits; the eval (and a validation file) must use the same classes as the train split."""
    train = read_split(cfg, "train", num_labels)
    eval_ = read_split(cfg, "eval", num_labels)
    if train.labels is not None:
        _same_classes(train, eval_, "eval")
    if cfg.validation is not None:
        validation = read_split(cfg, "validation", num_labels)
        if train.labels is not None:
            _same_classes(train, validation, "validation")
    else:
        if len(train) < 2:
            raise DataError(
                f"data.train: {train.path} has one example; a validation slice needs more (or set data.validation)"
            )
        dropped: set[int] = set()
        if cfg.validation_overlap == "exclude":
            labels = None if train.labels is None else tuple(train.labels)
            held, dropped = _held_apart(tuple(train.texts), labels, cfg.model_dump_json())
        else:
            held = validation_rows(train.labels, len(train), cfg)
        if not held:
            raise DataError(
                f"data.train: {train.path} has too few examples per class to set a validation slice aside; set "
                f"data.validation"
            )
        held_set = set(held)
        validation = _subset(train, held)
        train = _subset(train, [i for i in range(len(train.texts)) if i not in held_set and i not in dropped])
    return Splits(train=train, validation=validation, eval=eval_)


def _same_classes(train: Split, other: Split, name: str) -> None:
    train_set, other_set = set(train.labels), set(other.labels)
    if train_set != other_set:
        only_train, only_other = sorted(train_set - other_set), sorted(other_set - train_set)
        detail = "; ".join(
            part
            for part in (
                f"only in train: {only_train}" if only_train else "",
                f"only in {name}: {only_other}" if only_other else "",
            )
            if part
        )
        raise DataError(f"data: train ({train.path}) and {name} ({other.path}) have different label sets ({detail})")


def data_fingerprint(cfg: DataConfig) -> str:
    """What the learning and choosing stages read: the train and validation files' bytes and how they are cut and
    parsed. The eval file is not part of it: it decides nothing, so changing it rebuilds nothing."""
    digest = hashlib.sha256(cfg.model_dump_json(exclude={"dir", "train", "eval", "validation"}).encode())
    for split in ("train", "validation") if cfg.validation is not None else ("train",):
        with cfg.path_of(split).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def share_inside(inner: Split, outer: Split) -> float:
    """The share of `inner`'s rows whose words appear, whole and in order, inside some row of `outer`."""
    haystack = "\n".join(f" {' '.join(t.split())} " for t in outer.texts)  # one C-speed substring search per row
    return sum(f" {' '.join(t.split())} " in haystack for t in inner.texts) / max(1, len(inner))


# above this share of validation rows inside training rows, choices are made on text the model has learned
OVERLAP_WARNING = 0.2


@task(name="check-data")
def check_data_task(cfg: DataConfig, num_labels: int) -> dict[str, float]:
    """Validates the splits up front (stages re-read the files themselves: records and paths flow, not data), and
    says how much of the validation text is trained on."""
    splits = load_splits(cfg, num_labels)
    inside = share_inside(splits.validation, splits.train)
    if inside > OVERLAP_WARNING:
        fix = (
            "set data.validation_overlap: exclude"
            if cfg.validation is None and cfg.validation_overlap == "allow"
            else "hold out other rows"
        )
        log.warning(
            "%.0f %% of the validation rows appear inside training rows: validation scores are inflated; %s",
            100 * inside,
            fix,
        )
    return {
        "train_examples": len(splits.train),
        "validation_examples": len(splits.validation),
        "eval_examples": len(splits.eval),
        "validation_inside_train": round(inside, 4),
    }
