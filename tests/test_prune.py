"""Structured pruning of the tiny BERT: shapes as asked, the weakest heads go, reload, ONNX parity, recovery."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from squeezeflow.tasks.data import load_splits
from squeezeflow.tasks.export import ExportConfig, export
from squeezeflow.tasks.prune import PruneConfig, prune, prune_model
from squeezeflow.tasks.runtime import load_predictor
from squeezeflow.tasks.training import TrainConfig
from squeezeflow.tasks.variant import StageContext, Variant

from .conftest import sentiment_rows

ROWS = sentiment_rows(64, seed=3)
TEXTS, LABELS = [t for t, _ in ROWS], [y for _, y in ROWS]


def load(path):
    return AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()


def shapes(model):
    return [
        (l.attention.self.query.out_features // l.attention.self.attention_head_size, l.intermediate.dense.out_features)
        for l in model.bert.encoder.layer
    ]


@pytest.mark.parametrize(
    "knobs, expected",
    [
        ({}, (2, 32)),
        ({"heads": False}, (4, 32)),
        ({"ffn": False}, (2, 64)),
        ({"iterative_steps": 2, "criterion": "magnitude"}, (2, 32)),
    ],
)
def test_head_and_channel_counts_as_asked(tiny_model_dir, knobs, expected):
    model, tokenizer = load(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    prune_model(model, tokenizer, 0.5, PruneConfig(ratios=[0.5], recovery=None, **knobs), TEXTS, LABELS, 32)
    assert shapes(model) == [expected, expected]
    assert model.config.intermediate_size == expected[1]
    assert all(len(h) == 4 - expected[0] for h in model.config.pruned_heads.values())
    logits = model(**tokenizer(TEXTS[:3], padding=True, return_tensors="pt")).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


def test_magnitude_removes_the_weakest_heads(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # heads 0 and 2 of layer 1 made nearly silent: they must be the ones removed
        attention = model.bert.encoder.layer[1].attention
        for head in (0, 2):
            for linear in (attention.self.query, attention.self.key, attention.self.value):
                linear.weight[head * 8 : (head + 1) * 8] *= 1e-3
            attention.output.dense.weight[:, head * 8 : (head + 1) * 8] *= 1e-3
    removed = prune_model(
        model, tokenizer, 0.5, PruneConfig(ratios=[0.5], criterion="magnitude", recovery=None), TEXTS, LABELS, 32
    )
    assert sorted(removed[1]) == [0, 2]


def test_pruned_variant_reloads_with_from_pretrained_and_exports(tmp_path, trained_tiny):
    teacher, data = trained_tiny
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher, cache_dir=tmp_path / "cache")
    cfg = PruneConfig(ratios=[0.5], recovery=TrainConfig(epochs=3, learning_rate=3e-3, batch_size=16))
    pruned = prune(teacher, 0.5, cfg, ctx, tmp_path / "variants")
    assert pruned.lineage == "teacher>prune[0.5]" and pruned.stage == "prune"
    assert pruned.metrics["prune_params_after_m"] < pruned.metrics["prune_params_before_m"]
    assert pruned.metrics["prune_heads_per_layer"] == 2 and pruned.metrics["prune_intermediate_size"] == 32

    reloaded = AutoModelForSequenceClassification.from_pretrained(
        pruned.path
    )  # plain from_pretrained, default attention
    assert shapes(reloaded) == [(2, 32), (2, 32)]
    eval_split = load_splits(data, 2).eval
    torch_logits = load_predictor(pruned.path, "hf").logits(eval_split.texts)
    # recovery distilled from the teacher: the task (one sentiment word decides) is still solved
    assert (torch_logits.argmax(-1) == np.asarray(eval_split.labels)).mean() >= 0.9

    for optimize in ("fusion", "none"):
        onnx_variant = export(pruned, ExportConfig(optimize=optimize), tmp_path / optimize)
        ort_logits = load_predictor(onnx_variant.path, "onnx").logits(eval_split.texts)
        np.testing.assert_allclose(ort_logits, torch_logits, atol=1e-4)

    again = prune(teacher, 0.5, cfg, ctx, tmp_path / "variants")  # same parent and knobs: the stored result
    assert again == pruned


def test_ratios_must_lie_between_zero_and_one():
    with pytest.raises(ValueError, match="at least 0 and below 1"):
        PruneConfig(ratios=[0.3, 1.0])


def test_prune_refuses_onnx_parents(tmp_path, trained_tiny):
    teacher, data = trained_tiny
    onnx_parent = Variant(id="x", stage="export", lineage="teacher>onnx", format="onnx", path=str(tmp_path))
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7)
    with pytest.raises(Exception, match="PyTorch variants"):
        prune(onnx_parent, 0.5, PruneConfig(ratios=[0.5]), ctx, tmp_path)


def test_task_vocabulary_keeps_the_words_the_data_uses(tmp_path, trained_tiny):
    teacher, data = trained_tiny
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher)
    full = AutoTokenizer.from_pretrained(teacher.path)
    eval_split = load_splits(data, 2).eval
    # the 10 most frequent words (filler: 14 filler words each outnumber any one sentiment word) + 5 special tokens
    small = prune(teacher, 0.0, PruneConfig(ratios=[0.0], vocabulary=10), ctx, tmp_path)
    assert small.lineage == "teacher>prune[vocab10]"
    assert small.metrics["prune_vocabulary_size"] == 15 and small.metrics["prune_unk_rate_validation"] > 0.1
    task = prune(teacher, 0.0, PruneConfig(ratios=[0.0], vocabulary="task"), ctx, tmp_path)
    assert task.lineage == "teacher>prune[vocab]" and task.metrics["prune_unk_rate_validation"] == 0.0
    reloaded = AutoModelForSequenceClassification.from_pretrained(task.path)
    tokenizer = AutoTokenizer.from_pretrained(task.path)
    assert reloaded.config.vocab_size == len(tokenizer) == len(full)  # this tiny task uses every word it has
    np.testing.assert_allclose(
        load_predictor(task.path, "hf").logits(eval_split.texts),
        load_predictor(teacher.path, "hf").logits(eval_split.texts),
        atol=1e-5,
    )
    # the 10-word model: every kept token is renumbered onto its own embedding row, the rest become [UNK]
    small_tokenizer = AutoTokenizer.from_pretrained(small.path)
    old_rows = AutoModelForSequenceClassification.from_pretrained(teacher.path).get_input_embeddings().weight
    new_rows = AutoModelForSequenceClassification.from_pretrained(small.path).get_input_embeddings().weight
    assert new_rows.shape[0] == len(small_tokenizer) == 15
    for token, new_id in small_tokenizer.get_vocab().items():
        assert torch.equal(new_rows[new_id], old_rows[full.convert_tokens_to_ids(token)]), token
    assert small_tokenizer.convert_ids_to_tokens(small_tokenizer("superb movie")["input_ids"]) == [
        "[CLS]",
        "[UNK]",
        "movie",
        "[SEP]",
    ]
    onnx_variant = export(task, ExportConfig(), tmp_path / "onnx")
    np.testing.assert_allclose(
        load_predictor(onnx_variant.path, "onnx").logits(eval_split.texts),
        load_predictor(task.path, "hf").logits(eval_split.texts),
        atol=1e-4,
    )
