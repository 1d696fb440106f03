"""The bad-input corpus: every recipe in tests/bad_inputs/ must end with one clear line naming the problem,
a non-zero exit, no traceback and nothing written. The first line of each file says what the line must contain."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from squeezeflow.flows.cli import app

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*.yaml"))


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad-inputs")
    shutil.copytree(CORPUS, work, dirs_exist_ok=True)
    corrupt = work / "models" / "corrupt"  # made here so no fake model file is tracked in the repository
    corrupt.mkdir(parents=True)
    (corrupt / "config.json").write_text(
        '{"model_type": "bert", "vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1, '
        '"num_attention_heads": 2, "intermediate_size": 16}'
    )
    (corrupt / "model.safetensors").write_bytes(b"this is not a safetensors file")
    make_models(work / "models")
    return work


def make_models(root: Path) -> None:
    """Tiny BERT directories that each break one thing preflight checks: no tokenizer; a tokenizer with more tokens
    than the embeddings have rows; 64 position embeddings (the recipe asks for 128 tokens); and an ALBERT and a
    DeBERTa, whose families some stages do not support."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    shape = {
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "num_labels": 2,
    }
    for name, vocab_size, positions, with_tokenizer in (
        ("no_tokenizer", len(tokenizer), 64, False),
        ("big_vocab", 8, 64, True),
        ("short_positions", len(tokenizer), 64, True),
    ):
        config = BertConfig(vocab_size=vocab_size, max_position_embeddings=positions, **shape)
        BertForSequenceClassification(config).save_pretrained(root / name)
        if with_tokenizer:
            tokenizer.save_pretrained(root / name)
    from transformers import (
        AlbertConfig,
        AlbertForSequenceClassification,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
    )

    for name, model in (
        ("albert", AlbertForSequenceClassification(AlbertConfig(vocab_size=len(tokenizer), embedding_size=8, **shape))),
        ("deberta", DebertaV2ForSequenceClassification(DebertaV2Config(vocab_size=len(tokenizer), **shape))),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_input_gives_one_clear_line(case, workdir, monkeypatch):
    expected = case.read_text().splitlines()[0].removeprefix("# expect: ")
    monkeypatch.chdir(workdir)
    before = sorted(p.name for p in workdir.rglob("*"))
    result = CliRunner().invoke(app, ["validate", case.name])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    after = sorted(p.name for p in workdir.rglob("*") if p.name != "artifacts")
    assert after == [n for n in before if n != "artifacts"]  # nothing written (an empty artifacts/ at most)
