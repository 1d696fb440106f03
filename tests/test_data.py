import json

import pytest

from squeezeflow.tasks.base import DataError
from squeezeflow.tasks.data import DataConfig, check_data_task, data_fingerprint, load_splits, read_split, share_inside

from .conftest import write_tsv


def config(tmp_path, train="train.tsv", eval_="eval.tsv", **extra) -> DataConfig:
    return DataConfig(dir=tmp_path, train=train, eval=eval_, **extra)


def test_reads_tsv_and_maps_label_names(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("good one", "pos"), ("bad one", 0)])
    write_tsv(tmp_path / "eval.tsv", [("fine", 1), ("meh", "neg")])
    cfg = config(tmp_path, label_names=["neg", "pos"])
    train, eval_ = read_split(cfg, "train", 2), read_split(cfg, "eval", 2)
    assert train.texts == ["good one", "bad one"] and train.labels == [1, 0]
    assert eval_.labels == [1, 0]


def test_reads_csv_with_quotes_and_jsonl(tmp_path):
    (tmp_path / "train.csv").write_text('sentence,y\n"hello, world",1\nbye,0\n')
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"sentence": "hi", "y": 1}) + "\n\n" + json.dumps({"sentence": "no", "y": 0}) + "\n"
    )
    cfg = config(tmp_path, "train.csv", "eval.jsonl", text_column="sentence", label_column="y")
    train, eval_ = read_split(cfg, "train", 2), read_split(cfg, "eval", 2)
    assert train.texts[0] == "hello, world"
    assert eval_.texts == ["hi", "no"] and eval_.labels == [1, 0]


def test_missing_file_names_the_split_and_path(tmp_path):
    with pytest.raises(DataError, match=r"data.train: file not found: .*nope.tsv"):
        read_split(config(tmp_path, train="nope.tsv"), "train", 2)


def test_missing_column_lists_the_columns_found(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("a", 1)], header=("text", "sentiment"))
    with pytest.raises(DataError, match=r"train.tsv: missing column 'label' \(found: text, sentiment\)"):
        read_split(config(tmp_path), "train", 2)


def test_empty_split(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\n")
    with pytest.raises(DataError, match=r"data.train: .*train.tsv holds no examples"):
        read_split(config(tmp_path), "train", 2)


def test_non_integer_label_names_row_and_column(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("a", 1), ("b", "positive")])
    with pytest.raises(
        DataError, match=r"train.tsv, row 3, column 'label': expected an integer in 0..1, got 'positive'"
    ):
        read_split(config(tmp_path), "train", 2)


def test_label_out_of_range(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("a", 1), ("b", 5)])
    with pytest.raises(DataError, match=r"row 3, column 'label': label 5 is out of range, expected 0..2"):
        read_split(config(tmp_path), "train", 3)


def test_ragged_row(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\na\t1\nb\t0\textra\n")
    with pytest.raises(DataError, match=r"train.tsv, row 3: expected 2 TSV columns \(text, label\), found 3"):
        read_split(config(tmp_path), "train", 2)


def test_empty_text(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\n  \t1\n")
    with pytest.raises(DataError, match=r"row 2, column 'text': expected non-empty text"):
        read_split(config(tmp_path), "train", 2)


def test_different_label_sets_between_splits(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 1), ("c", 2)])
    write_tsv(tmp_path / "eval.tsv", [("a", 0), ("b", 1)])
    with pytest.raises(DataError, match=r"different label sets \(only in train: \[2\]\)"):
        load_splits(config(tmp_path), 3)


def test_bad_json_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(DataError, match=r"train.jsonl, line 2: not valid JSON"):
        read_split(config(tmp_path, train="train.jsonl"), "train", 2)


def test_unknown_extension_asks_for_format(tmp_path):
    (tmp_path / "train.txt").write_text("text\tlabel\na\t1\n")
    with pytest.raises(DataError, match="set data.format"):
        read_split(config(tmp_path, train="train.txt"), "train", 2)
    split = read_split(config(tmp_path, train="train.txt", format="tsv"), "train", 2)
    assert split.labels == [1]


def test_validation_is_a_stratified_seeded_slice_of_train_that_no_stage_trains_on(tmp_path):
    rows = [(f"text {i}", 0 if i % 4 else 1) for i in range(400)]  # 300 of class 0, 100 of class 1
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "eval.tsv", [("a", 0), ("b", 1)])
    splits = load_splits(config(tmp_path, validation_fraction=0.2), 2)
    assert len(splits.validation) == 80 and splits.validation.labels.count(1) == 20
    assert not set(splits.validation.texts) & set(splits.train.texts)
    assert sorted(splits.train.texts + splits.validation.texts) == sorted(t for t, _ in rows)
    assert load_splits(config(tmp_path, validation_fraction=0.2), 2).validation.texts == splits.validation.texts
    assert (
        load_splits(config(tmp_path, validation_fraction=0.2, validation_seed=1), 2).validation.texts
        != splits.validation.texts
    )
    assert len(load_splits(config(tmp_path, validation_fraction=0.2, validation_max=40), 2).validation) == 40


def treebank_rows(sentences: int) -> list[tuple[str, int]]:
    """Whole sentences, each followed by some of its phrases (word spans), as a sentiment treebank's train file."""
    rows = []
    for i in range(sentences):
        words = f"film {i} was {'good' if i % 3 else 'bad'} and long".split()
        label = 1 if i % 3 else 0
        rows += [
            (" ".join(words), label),
            (" ".join(words[:4]), label),
            (" ".join(words[1:4]), label),
            (words[3], label),
        ]
    return rows


def test_validation_overlap_exclude_holds_whole_rows_and_drops_their_phrases_from_train(tmp_path):
    rows = treebank_rows(60)
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "eval.tsv", [("a", 0), ("b", 1)])
    splits = load_splits(config(tmp_path, validation_fraction=0.1, validation_overlap="exclude"), 2)
    whole = {text for text, _ in rows[::4]}
    assert len(splits.validation) == 24 and set(splits.validation.texts) <= whole
    assert 0 < splits.validation.labels.count(0) < splits.validation.labels.count(1)
    held_phrases = {" ".join(t.split()[:4]) for t in splits.validation.texts} | {
        " ".join(t.split()[1:4]) for t in splits.validation.texts
    }
    assert not held_phrases & set(splits.train.texts)  # no part of a held sentence is trained on
    assert not {"good", "bad"} & set(splits.train.texts)  # a phrase other rows share leaves train too...
    kept = [t for t, _ in rows[::4] if t not in set(splits.validation.texts)]
    assert set(kept) <= set(splits.train.texts)  # ...but the other sentences stay
    allow = load_splits(config(tmp_path, validation_fraction=0.1), 2)
    assert len(allow.train) + len(allow.validation) == len(rows) and not set(allow.validation.texts) <= whole


def test_the_data_check_measures_and_warns_when_validation_text_is_trained_on(tmp_path, caplog):
    write_tsv(tmp_path / "train.tsv", treebank_rows(60))
    write_tsv(tmp_path / "eval.tsv", [("a", 0), ("b", 1)])
    leaky = config(tmp_path, validation_fraction=0.2)
    with caplog.at_level("WARNING", logger="squeezeflow.data"):
        counts = check_data_task.fn(leaky, 2)
    assert counts["validation_inside_train"] > 0.5
    assert "appear inside training rows" in caplog.text and "data.validation_overlap: exclude" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="squeezeflow.data"):
        assert (
            check_data_task.fn(config(tmp_path, validation_fraction=0.2, validation_overlap="exclude"), 2)[
                "validation_inside_train"
            ]
            == 0
        )
    assert not caplog.text
    splits = load_splits(leaky, 2)
    assert share_inside(splits.validation, splits.validation) == 1.0  # every row lies inside itself


def test_validation_overlap_exclude_needs_whole_rows_of_every_class(tmp_path):
    rows = treebank_rows(30) + [("the plot", 2), ("the plot twist", 2)]  # class 2 has one whole row
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "eval.tsv", [("a", 0), ("b", 1), ("c", 2)])
    with pytest.raises(DataError, match=r"data.validation_overlap: exclude needs two whole rows .* classes \[2\]"):
        load_splits(config(tmp_path, validation_overlap="exclude"), 3)


def test_a_validation_file_is_used_whole_and_checked_like_eval(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 1), ("c", 2)])
    write_tsv(tmp_path / "eval.tsv", [("a", 0), ("b", 1), ("c", 2)])
    write_tsv(tmp_path / "val.tsv", [("v", 0), ("w", 1), ("x", 2)])
    splits = load_splits(config(tmp_path, validation="val.tsv"), 3)
    assert splits.train.texts == ["a", "b", "c"] and splits.validation.texts == ["v", "w", "x"]
    write_tsv(tmp_path / "val.tsv", [("v", 0), ("w", 1)])
    with pytest.raises(
        DataError, match=r"train .* and validation .* have different label sets \(only in train: \[2\]\)"
    ):
        load_splits(config(tmp_path, validation="val.tsv"), 3)


def test_too_small_a_train_file_for_a_validation_slice_says_what_to_do(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 1)])
    write_tsv(tmp_path / "eval.tsv", [("a", 0), ("b", 1)])
    with pytest.raises(
        DataError, match="too few examples per class to set a validation slice aside; set data.validation"
    ):
        load_splits(config(tmp_path), 2)


def test_the_data_fingerprint_covers_train_and_validation_but_not_eval(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 1)] * 10)
    write_tsv(tmp_path / "eval.tsv", [("a", 0), ("b", 1)])
    before = data_fingerprint(config(tmp_path))
    write_tsv(tmp_path / "eval.tsv", [("a", 1), ("b", 0)])
    assert data_fingerprint(config(tmp_path)) == before
    assert data_fingerprint(config(tmp_path, validation_fraction=0.2)) != before
    assert data_fingerprint(config(tmp_path, validation_overlap="exclude")) != before
    write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 1)] * 11)
    assert data_fingerprint(config(tmp_path)) != before
