"""Early exit on the tiny BERT: the exit rules, the chained ONNX graph against the PyTorch reference (entropy and
patience), the extremes of the threshold, INT8 segments, and the stage's input checks."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from transformers import AutoTokenizer

from squeezeflow.tasks.base import ModelError
from squeezeflow.tasks.data import load_splits
from squeezeflow.tasks.early_exit import EarlyExitConfig, early_exit, load_exit_model, reference_logits
from squeezeflow.tasks.quantize import QuantizeConfig, quantize
from squeezeflow.tasks.runtime import FOUR_BIT_CODES, EntropyRule, PatienceRule, load_predictor, normalized_entropy
from squeezeflow.tasks.variant import StageContext

CFG = {"training": {"epochs": 4, "learning_rate": 3e-3, "batch_size": 16}}


@pytest.fixture(scope="module")
def made(tmp_path_factory, trained_tiny):
    """Early-exit variants of the trained tiny model at three entropy thresholds (the exits are trained once)."""
    teacher, data = trained_tiny
    out = tmp_path_factory.mktemp("early-exit")
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher, cache_dir=out / "cache")
    variants = {t: early_exit(teacher, t, EarlyExitConfig(thresholds=[t], **CFG), ctx, out) for t in (0.0, 0.5, 1.0)}
    eval_split = load_splits(data, 2).eval
    return teacher, variants, eval_split, out


def test_entropy_and_patience_rules():
    certain, unsure = np.array([[9.0, -9.0]]), np.array([[0.0, 0.0]])
    assert normalized_entropy(certain)[0] < 0.01 and normalized_entropy(unsure)[0] == pytest.approx(1.0)
    assert EntropyRule(0.5).fires(np.vstack([certain, unsure])).tolist() == [True, False]
    assert not EntropyRule(0.0).fires(certain).any()
    rule = PatienceRule(2)
    rule.reset(2)
    layers = [
        np.array([[1.0, 0.0], [1.0, 0.0]]),
        np.array([[1.0, 0.0], [0.0, 1.0]]),
        np.array([[1.0, 0.0], [0.0, 1.0]]),
    ]
    assert [rule.fires(l).tolist() for l in layers] == [[False, False], [False, False], [True, False]]


def test_mean_pooled_exit_ignores_padding(made):
    import torch

    _, _, _, out = made
    head = load_exit_model(next(p for p in out.iterdir() if p.name.startswith("exits-"))).heads[0]
    assert head.pooling == "mean"
    hidden = torch.randn(1, 5, head.dense.in_features)
    padded = torch.cat([hidden, 100 * torch.randn(1, 3, head.dense.in_features)], dim=1)
    alone = head(hidden, torch.ones(1, 5, dtype=torch.long))
    with_padding = head(padded, torch.tensor([[1] * 5 + [0] * 3]))
    torch.testing.assert_close(alone, with_padding)


def test_threshold_that_always_fires_exits_at_layer_one(made):
    _, variants, eval_split, _ = made
    predictor = load_predictor(variants[1.0].path, "onnx-exit")
    predictor.logits(eval_split.texts)
    assert set(predictor.last_exit_layers.tolist()) == {1}


def test_threshold_that_never_fires_gives_the_full_models_logits(made):
    teacher, variants, eval_split, _ = made
    predictor = load_predictor(variants[0.0].path, "onnx-exit")
    logits = predictor.logits(eval_split.texts)
    assert set(predictor.last_exit_layers.tolist()) == {2}
    np.testing.assert_allclose(logits, load_predictor(teacher.path, "hf").logits(eval_split.texts), atol=1e-4)


def test_chained_onnx_graph_agrees_with_pytorch(made):
    teacher, variants, eval_split, out = made
    exit_model = load_exit_model(next(p for p in out.iterdir() if p.name.startswith("exits-")))
    inputs = dict(AutoTokenizer.from_pretrained(teacher.path)(eval_split.texts, padding=True, return_tensors="pt"))
    for threshold in (0.0, 0.5, 1.0):
        expected, expected_layers = reference_logits(exit_model, inputs, "entropy", threshold)
        predictor = load_predictor(variants[threshold].path, "onnx-exit")
        np.testing.assert_allclose(predictor.logits(eval_split.texts), expected, atol=1e-4)
        assert predictor.last_exit_layers.tolist() == expected_layers.tolist()


@pytest.fixture(scope="module")
def with_embedding_exit(tmp_path_factory, trained_tiny):
    """Early-exit variants with an exit on the embeddings too, at thresholds that never, sometimes and always fire."""
    teacher, data = trained_tiny
    out = tmp_path_factory.mktemp("embedding-exit")
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher)
    cfg = EarlyExitConfig(thresholds=[0.0, 0.5, 1.0], embedding_exit=True, **CFG)
    variants = {t: early_exit(teacher, t, cfg, ctx, out) for t in cfg.thresholds}
    eval_split = load_splits(data, 2).eval
    return teacher, variants, eval_split, out, ctx


def test_embedding_exit_lets_inputs_skip_every_layer(with_embedding_exit):
    teacher, variants, eval_split, out, _ = with_embedding_exit
    segments = [onnx.load(str(f)).graph for f in sorted(Path(variants[0.5].path, "segments").glob("*.onnx"))]
    assert len(segments) == 3  # the embeddings with their exit, then one graph per layer
    assert "EmbedLayerNormalization" in {n.op_type for n in segments[0].node}
    assert not {"Attention", "MatMul"} & {n.op_type for n in segments[0].node if "head" not in n.name}
    assert all("Attention" in {n.op_type for n in g.node} for g in segments[1:])
    assert variants[0.5].metrics["early_exit_layers"] == 2.0

    exit_model = load_exit_model(next(p for p in out.iterdir() if p.name.startswith("exits-")))
    inputs = dict(AutoTokenizer.from_pretrained(teacher.path)(eval_split.texts, padding=True, return_tensors="pt"))
    for threshold, variant in variants.items():
        expected, expected_layers = reference_logits(exit_model, inputs, "entropy", threshold)
        predictor = load_predictor(variant.path, "onnx-exit")
        np.testing.assert_allclose(predictor.logits(eval_split.texts), expected, atol=1e-4)
        assert predictor.last_exit_layers.tolist() == expected_layers.tolist()

    always = load_predictor(variants[1.0].path, "onnx-exit")
    guesses = always.logits(eval_split.texts).argmax(-1)
    assert set(always.last_exit_layers.tolist()) == {0}
    assert (guesses == np.asarray(eval_split.labels)).mean() >= 0.9  # the task's answer is in which words occur
    never = load_predictor(variants[0.0].path, "onnx-exit")
    np.testing.assert_allclose(
        never.logits(eval_split.texts), load_predictor(teacher.path, "hf").logits(eval_split.texts), atol=1e-4
    )
    assert set(never.last_exit_layers.tolist()) == {2}


def test_embedding_exit_segments_quantize(with_embedding_exit):
    _, variants, eval_split, out, ctx = with_embedding_exit
    fp32 = load_predictor(variants[0.5].path, "onnx-exit").logits(eval_split.texts).argmax(-1)
    for mode in ("dynamic", "static"):
        int8 = quantize(variants[0.5], mode, QuantizeConfig(modes=[mode], calibration_examples=16), ctx, out)
        embedding_ops = {n.op_type for n in onnx.load(str(Path(int8.path, "segments", "segment_00.onnx"))).graph.node}
        assert {
            "EmbedLayerNormalization",
            "MatMulIntegerToFloat" if mode == "static" else "MatMulInteger",
        } <= embedding_ops, mode
        got = load_predictor(int8.path, "onnx-exit").logits(eval_split.texts).argmax(-1)
        assert (got == fp32).mean() >= 0.9, mode


def test_embedding_exit_needs_mean_pooling():
    with pytest.raises(ValueError, match="embedding_exit needs pooling: mean"):
        EarlyExitConfig(thresholds=[0.5], embedding_exit=True, pooling="cls")


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory, tiny_model_dir, trained_tiny):
    """A 3-layer tiny classifier, so that a patience exit can fire before the last layer."""
    from transformers import BertConfig, BertForSequenceClassification

    from squeezeflow.tasks.teacher import ModelConfig, TeacherConfig, make_teacher

    root = tmp_path_factory.mktemp("three-layers")
    config = BertConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 3
    BertForSequenceClassification(config).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "model")
    data = trained_tiny[1]
    teacher = make_teacher(
        ModelConfig(source=str(root / "model"), num_labels=2, max_length=32),
        TeacherConfig(epochs=6, learning_rate=3e-3, batch_size=16),
        data,
        root / "variants",
        seed=7,
    )
    return teacher, data, root


def test_patience_graph_agrees_with_pytorch(three_layers):
    teacher, data, root = three_layers
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher)
    variant = early_exit(
        teacher, 1, EarlyExitConfig(criterion="patience", thresholds=[1], **CFG), ctx, root / "variants"
    )
    eval_split = load_splits(data, 2).eval
    exit_model = load_exit_model(next(p for p in (root / "variants").iterdir() if p.name.startswith("exits-")))
    inputs = dict(AutoTokenizer.from_pretrained(teacher.path)(eval_split.texts, padding=True, return_tensors="pt"))
    expected, expected_layers = reference_logits(exit_model, inputs, "patience", 1)
    predictor = load_predictor(variant.path, "onnx-exit")
    np.testing.assert_allclose(predictor.logits(eval_split.texts), expected, atol=1e-4)
    assert predictor.last_exit_layers.tolist() == expected_layers.tolist()
    assert 2 in expected_layers.tolist()  # patience 1: two agreeing exits end it at layer 2


def test_the_first_exit_learns_the_task(made):
    _, variants, eval_split, _ = made
    predictions = load_predictor(variants[1.0].path, "onnx-exit").logits(eval_split.texts).argmax(-1)
    assert (predictions == np.asarray(eval_split.labels)).mean() >= 0.9


def test_exits_are_trained_once_and_variants_reused(made, trained_tiny):
    teacher, variants, _, out = made
    assert len([p for p in out.iterdir() if p.name.startswith("exits-")]) == 1
    assert variants[0.5].lineage == "teacher>early_exit[0.5]" and variants[0.5].format == "onnx-exit"
    ctx = StageContext(data=trained_tiny[1], num_labels=2, max_length=32, seed=7, teacher=teacher)
    assert early_exit(teacher, 0.5, EarlyExitConfig(thresholds=[0.5], **CFG), ctx, out) == variants[0.5]


def test_int8_segments_run_and_agree(made, trained_tiny):
    _, variants, eval_split, out = made
    ctx = StageContext(data=trained_tiny[1], num_labels=2, max_length=32, seed=7)
    int8 = quantize(variants[0.5], "dynamic", QuantizeConfig(modes=["dynamic"]), ctx, out)
    assert int8.format == "onnx-exit" and int8.lineage == "teacher>early_exit[0.5]>int8-dynamic"
    assert sorted(p.name for p in Path(int8.path).glob("*.onnx")) == ["model.onnx"]
    assert sorted(p.name for p in Path(int8.path, "segments").glob("*.onnx")) == ["segment_00.onnx", "segment_01.onnx"]
    fp32 = load_predictor(variants[0.5].path, "onnx-exit").logits(eval_split.texts).argmax(-1)
    got = load_predictor(int8.path, "onnx-exit").logits(eval_split.texts).argmax(-1)
    assert (got == fp32).mean() >= 0.9

    # 4-bit embeddings: only the first segment holds the embedding tables
    four = quantize(
        variants[0.5],
        "dynamic",
        QuantizeConfig(quantize_embeddings=True, embedding_bits=4, embedding_block_size=16),
        ctx,
        out,
    )
    packed = [
        {t.name for t in onnx.load(graph).graph.initializer if t.name.endswith(FOUR_BIT_CODES)}
        for graph in sorted(Path(four.path, "segments").glob("*.onnx"))
    ]
    assert len(packed[0]) == 2 and not packed[1]  # word and position tables
    got = load_predictor(four.path, "onnx-exit").logits(eval_split.texts).argmax(-1)
    assert (got == fp32).mean() >= 0.9


def test_static_segments_are_calibrated_one_by_one(made, trained_tiny):
    """Static INT8 of an early-exit variant: every segment runs with fixed activation ranges (no range measured per
    call), the chained graph agrees with its fp32 parent, and the drop against it is reported."""
    _, variants, eval_split, out = made
    ctx = StageContext(data=trained_tiny[1], num_labels=2, max_length=32, seed=7)
    int8 = quantize(
        variants[0.5],
        "static",
        QuantizeConfig(modes=["static"], calibration_examples=16, accuracy_tolerance=0.05),
        ctx,
        out,
    )
    assert int8.format == "onnx-exit" and int8.lineage == "teacher>early_exit[0.5]>int8-static"
    for graph in sorted(Path(int8.path, "segments").glob("*.onnx")):
        ops = {n.op_type for n in onnx.load(str(graph)).graph.node}
        assert "DynamicQuantizeLinear" not in ops and {"QuantizeLinear", "MatMulIntegerToFloat"} <= ops, graph.name
    fp32 = load_predictor(variants[0.5].path, "onnx-exit").logits(eval_split.texts).argmax(-1)
    got = load_predictor(int8.path, "onnx-exit").logits(eval_split.texts).argmax(-1)
    assert (got == fp32).mean() >= 0.9
    assert int8.metrics["fallback_tolerance_met"] == 1.0 and int8.metrics["fallback_excluded_nodes"] == 0.0
    with pytest.raises(
        ModelError, match=r"quantize.exclude_nodes: \['MatMul_1'\] are not MatMul or Attention nodes of .*'s segments"
    ):
        quantize(
            variants[0.5],
            "static",
            QuantizeConfig(modes=["static"], calibration_examples=16, exclude_nodes=["MatMul_1"]),
            ctx,
            out,
        )


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"thresholds": [1.5]}, r"entropy thresholds must lie in \[0, 1\]"),
        ({"criterion": "patience", "thresholds": [0.5]}, "whole numbers"),
    ],
)
def test_thresholds_out_of_range_are_refused(knobs, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitConfig(**knobs)


def test_params_of_the_chained_graph_count_every_layer(made):
    import onnx

    from squeezeflow.tasks.evaluate import count_params

    _, variants, _, _ = made
    variant = variants[0.5]
    in_segments = sum(
        int(np.prod(t.dims))
        for f in sorted(Path(variant.path, "segments").glob("*.onnx"))
        for t in onnx.load(str(f)).graph.initializer
    )
    assert count_params(variant) >= in_segments  # plus the few constants of the exit rules
    assert count_params(variant) - in_segments < 10


def _mask_only_nodes(graph) -> list:
    """The nodes of `graph` (not its subgraphs) that read the attention mask, directly or through such nodes,
    and nothing else but constants."""
    constants = {t.name for t in graph.initializer}
    derived, found = {"attention_mask"}, []
    for node in graph.node:
        inputs = [x for x in node.input if x]
        if node.op_type == "Constant":
            constants.update(node.output)
        elif inputs and all(x in derived or x in constants for x in inputs) and any(x in derived for x in inputs):
            derived.update(node.output)
            found.append(node)
    return found


def test_the_chained_graph_derives_each_mask_value_once(three_layers):
    """Every segment derives the same values from the attention mask (its casts, its sums, the token count the
    pooling divides by); the chained graph computes each once, where it is first needed, and the deeper
    segments read it from the enclosing graph."""
    teacher, data, root = three_layers
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher)
    variant = early_exit(teacher, 0.5, EarlyExitConfig(thresholds=[0.5], **CFG), ctx, root / "variants")
    segments = [onnx.load(str(f)).graph for f in sorted(Path(variant.path, "segments").glob("*.onnx"))]
    assert len(segments) == 3 and all(_mask_only_nodes(g) for g in segments)

    scopes, graph = [], onnx.load(str(Path(variant.path) / "model.onnx")).graph
    while graph is not None:  # the top graph, then each exit's else-branch: the rest of the network
        scopes.append(graph)
        branch = next((n for n in graph.node if n.op_type == "If"), None)
        graph = next((a.g for a in branch.attribute if a.name == "else_branch"), None) if branch else None
    assert len(scopes) == 3
    assert not _mask_only_nodes(scopes[2]), "the last segment recomputes what the middle one derived from the mask"
    assert len(_mask_only_nodes(scopes[1])) < len(_mask_only_nodes(segments[1]))
