"""runtime.TextEncoder: the ids, masks and type ids every predictor feeds its model are the tokenizer library's,
whether a text took the plain-Python WordPiece path or the library's."""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path

import numpy as np
import pytest

from squeezeflow.tasks.runtime import TextEncoder, library_encode, load_predictor
from squeezeflow.tasks.teacher import resolve_source

from .conftest import sentiment_rows

REPO = Path(__file__).resolve().parents[1]
SST2_DEV = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
AWKWARD = [
    "",
    "   ",
    "HELLO, World!!",
    "don't -- stop ... (really)?",
    "a [CLS] in the text",
    "[MASK]",
    "#hash ##tag",
    "x" * 150,
    "1,000.50 $ + <=> ^_^ |~` @home",
    "".join(f"w{c}" for c in string.punctuation),
    "tab\tinside",
    "line\nbreak",
    "café au lait",
    "naïve résumé",
    "emoji 🙂 here",
    "ok " * 300,
]


def texts_of(path: Path) -> list[str]:
    return [row[0] for row in csv.reader(path.open(encoding="utf-8"), delimiter="\t")][1:]


def assert_library_inputs(encoder: TextEncoder, texts: list[str]) -> int:
    """Each text alone, then in batches of 32, gives exactly the library's arrays; returns how many took the plain
    path."""
    for text in texts:
        ours, library = encoder([text]), library_encode(encoder.tokenizer, [text])
        for name, expected in library.items():
            np.testing.assert_array_equal(ours[name], expected, err_msg=f"{name} of {text[:60]!r}")
    for start in range(0, len(texts), 32):
        ours, library = encoder(texts[start : start + 32]), library_encode(encoder.tokenizer, texts[start : start + 32])
        for name, expected in library.items():
            np.testing.assert_array_equal(ours[name], expected, err_msg=f"{name} of the batch at {start}")
    return sum(encoder.plain.handles(t) for t in texts)


def test_the_packaged_tokenizer_gives_the_library_ids_on_every_text():
    encoder = TextEncoder(Path(resolve_source("packaged:all-MiniLM-L6-v2")))
    assert encoder.plain is not None
    texts = texts_of(REPO / "configs" / "demo" / "train.tsv") + texts_of(REPO / "configs" / "demo" / "eval.tsv")
    assert assert_library_inputs(encoder, texts + AWKWARD) >= len(texts)  # every demo sentence is plain ASCII


def test_sst2_dev_takes_the_plain_path_with_the_library_ids():
    if not SST2_DEV.exists():
        pytest.skip(f"{SST2_DEV} is not on this machine")
    encoder = TextEncoder(Path(resolve_source("packaged:all-MiniLM-L6-v2")))
    texts = texts_of(SST2_DEV)
    assert assert_library_inputs(encoder, texts) >= 0.99 * len(texts)


def test_a_small_vocabulary_and_short_truncation(tiny_model_dir):
    """The test vocabulary lacks most words (unknown pieces) and truncates at 32 tokens."""
    encoder = TextEncoder(tiny_model_dir)
    assert encoder.tokenizer.truncation["max_length"] == 32
    texts = (
        [text for text, _ in sentiment_rows(50, seed=3)]
        + [" ".join(["good movie"] * 40), "goodmovie unseen words!"]
        + AWKWARD
    )
    assert assert_library_inputs(encoder, texts) > 50
    assert encoder(["good movie " * 40])["input_ids"].shape == (1, 32)


def test_other_tokenizers_are_left_to_the_library(tmp_path, tiny_model_dir):
    """A pre-tokenizer other than BERT's (here: whitespace only) is not what the plain path computes."""
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "config.json",
        "model.safetensors",
    ):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    encoder = TextEncoder(tmp_path)
    assert encoder.plain is None
    columns = encoder(["good, movie"])
    np.testing.assert_array_equal(columns["input_ids"], library_encode(encoder.tokenizer, ["good, movie"])["input_ids"])
    # "good," is one unknown word here, where BERT's pre-tokenizer would split off the comma
    assert columns["input_ids"].shape == (1, 4)


def test_pytorch_and_onnx_predictors_read_the_same_inputs(tiny_model_dir):
    torch_predictor = load_predictor(tiny_model_dir, "hf")
    assert torch_predictor.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    texts = ["good movie", "the plot was really boring and the acting was poor"]
    padded = torch_predictor.encoder(texts)
    assert padded["attention_mask"].tolist()[0] == [1, 1, 1, 1] + [0] * (padded["input_ids"].shape[1] - 4)
    # a padded batch scores each text as it scores alone
    np.testing.assert_allclose(
        torch_predictor.logits(texts), np.concatenate([torch_predictor.logits([t]) for t in texts]), atol=1e-5
    )
