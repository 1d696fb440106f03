"""Loading and validating the train/eval splits (TSV, CSV or JSONL) with clear, row-precise errors."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field

from .base import DataError, StrictModel

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class DataConfig(StrictModel):
    dir: Path | None = Field(None, description="Base directory for `train` and `eval` (relative paths resolve against it).")
    train: Path = Field(description="Training split: a .tsv, .csv or .jsonl file with a header / keys.")
    eval: Path = Field(description="Evaluation split, same format; accuracy and latency are measured on it.")
    format: Literal["auto", "tsv", "csv", "jsonl"] = Field("auto", description="File format; auto = from the extension.")
    text_column: str = Field("text", description="Column (or JSON key) holding the input text.")
    label_column: str = Field("label", description="Column holding the class: an integer index or one of label_names.")
    label_names: list[str] | None = Field(None, description="Class names in index order (optional).")
    train_has_labels: bool = Field(
        True, description="False: the train split is unlabelled (students learn from the teacher's soft labels alone)."
    )

    def path_of(self, split: Literal["train", "eval"]) -> Path:
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
        raise DataError(f"{where}: label {value} is out of range, expected 0..{num_labels - 1} (model.num_labels={num_labels})")
    return value


def read_split(cfg: DataConfig, split: Literal["train", "eval"], num_labels: int) -> Split:
    path = cfg.path_of(split)
    try:
        return _read_split(cfg, split, num_labels, path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed {path.suffix.lstrip('.').upper() or 'data'} file ({e})") from None


def _read_split(cfg: DataConfig, split: Literal["train", "eval"], num_labels: int, path: Path) -> Split:
    if not path.is_file():
        raise DataError(f"data.{split}: file not found: {path}")
    fmt = cfg.format if cfg.format != "auto" else FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"data.{split}: cannot tell the format of {path} from its extension; set data.format to tsv, csv or jsonl")
    labelled = split == "eval" or cfg.train_has_labels
    columns = _columns(path, fmt)
    for column in (cfg.text_column, cfg.label_column) if labelled else (cfg.text_column,):
        if columns and column not in columns:
            raise DataError(f"{path}: missing column {column!r} (found: {', '.join(columns)}); set data.{'text' if column == cfg.text_column else 'label'}_column")
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
            labels.append(_parse_label(record[cfg.label_column], cfg.label_names, num_labels, f"{where}, column {cfg.label_column!r}"))
    if not texts:
        raise DataError(f"data.{split}: {path} holds no examples")
    return Split(path=path, texts=texts, labels=labels if labelled else None)


def load_splits(cfg: DataConfig, num_labels: int) -> tuple[Split, Split]:
    """Reads and checks both splits; the eval split must use the same classes as the train split."""
    train = read_split(cfg, "train", num_labels)
    eval_ = read_split(cfg, "eval", num_labels)
    if train.labels is None:
        return train, eval_
    train_set, eval_set = set(train.labels), set(eval_.labels)
    if train_set != eval_set:
        only_train, only_eval = sorted(train_set - eval_set), sorted(eval_set - train_set)
        detail = "; ".join(
            part for part in (
                f"only in train: {only_train}" if only_train else "",
                f"only in eval: {only_eval}" if only_eval else "",
            ) if part
        )
        raise DataError(f"data: train ({train.path}) and eval ({eval_.path}) have different label sets ({detail})")
    return train, eval_


@task(name="check-data")
def check_data_task(cfg: DataConfig, num_labels: int) -> dict[str, int]:
    """Validates both splits up front (stages re-read the files themselves: records and paths flow, not data)."""
    train, eval_ = load_splits(cfg, num_labels)
    return {"train_examples": len(train), "eval_examples": len(eval_)}
