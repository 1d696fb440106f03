"""Shared fixtures: a tiny BERT classifier built from a BertConfig, a small task with a known answer, a real
sqlite MLflow store in a tmp dir, and Prefect's ephemeral test harness."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import pytest

import squeezeflow.tasks  # noqa: F401  (sets the offline environment before prefect and mlflow load)

POSITIVE = ["good", "great", "excellent", "lovely", "superb", "wonderful"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "dreadful", "boring"]
FILLER = [
    "the",
    "movie",
    "film",
    "plot",
    "acting",
    "was",
    "really",
    "quite",
    "very",
    "and",
    "story",
    "music",
    "a",
    "it",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is decided by one sentiment word among neutral filler: a known answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 5)
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    rng.shuffle(rows)
    return rows


def write_tsv(path: Path, rows, header=("text", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT classifier (hidden 32, 4 heads) with a WordPiece tokenizer over the test vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=32)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    out = root / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, tiny_model_dir):
    """The tiny BERT fine-tuned on the known-answer task, with its data: (model_dir, DataConfig)."""
    from squeezeflow.tasks.data import DataConfig
    from squeezeflow.tasks.teacher import ModelConfig, TeacherConfig, make_teacher

    root = tmp_path_factory.mktemp("trained-tiny")
    data = DataConfig(
        train=write_tsv(root / "train.tsv", sentiment_rows(240, seed=1)),
        eval=write_tsv(root / "eval.tsv", sentiment_rows(60, seed=2)),
    )
    teacher = make_teacher(
        ModelConfig(source=str(tiny_model_dir), num_labels=2, max_length=32),
        TeacherConfig(epochs=6, learning_rate=3e-3, batch_size=16),
        data,
        root / "variants",
        seed=7,
    )
    return teacher, data


def make_tiny_config(root: Path, model_dir: Path) -> dict:
    """A complete recipe for the tiny model under `root`, as the dict a YAML file would hold."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "name": "tiny",
        "seed": 7,
        "model": {"source": str(model_dir), "num_labels": 2, "max_length": 32},
        "data": {
            "train": str(write_tsv(root / "train.tsv", sentiment_rows(240, seed=1))),
            "eval": str(write_tsv(root / "eval.tsv", sentiment_rows(60, seed=2))),
            "label_names": ["neg", "pos"],
        },
        "teacher": {"finetune": True, "epochs": 6, "learning_rate": 3e-3, "batch_size": 16},
        "stages": [{"kind": "export"}, {"kind": "quantize", "modes": ["dynamic"]}],
        "benchmark": {"threads": 1, "warmup": 2, "rounds": 2, "latency_texts": 20},
        "selection": {"max_accuracy_drop": 0.05},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "registered_model": "tiny-classifier"},
        "artifacts_dir": str(root / "artifacts"),
    }


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def tiny_config(tmp_path, tiny_model_dir) -> dict:
    return make_tiny_config(tmp_path, tiny_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}")


def written(directory: Path) -> list[Path]:
    """What `directory` holds but lock files: a lock tells concurrent makers to wait; no run trusts it."""
    if not Path(directory).exists():
        return []
    return sorted(p for p in Path(directory).iterdir() if not p.name.endswith(".lock"))
