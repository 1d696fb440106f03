"""Export and INT8 quantization on the tiny BERT: the graphs run in ORT with integer kernels and agree with
their fp32 parents."""

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from squeezeflow.tasks.base import DataError, ModelError, StageBase
from squeezeflow.tasks.evaluate import count_params
from squeezeflow.tasks.export import ExportConfig, export, fuse_lone_embeddings
from squeezeflow.tasks.quantize import MODE_KNOBS, QATConfig, QuantizeConfig, quantize
from squeezeflow.tasks.runtime import FOUR_BIT_CODES, load_predictor
from squeezeflow.tasks.variant import StageContext, Variant

from .conftest import sentiment_rows, written

TEXTS = [text for text, _ in sentiment_rows(16, seed=3)] + [
    "an unknownword and a much longer sentence about the film plot acting music"
]
INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QLinearMatMul", "MatMulIntegerToFloat"}


@pytest.fixture()
def root(tiny_model_dir) -> Variant:
    return Variant(id="teacher-x", stage="teacher", lineage="teacher", format="hf", path=str(tiny_model_dir))


@pytest.fixture(scope="module")
def trained(trained_tiny, tmp_path_factory):
    """(teacher, its ONNX export, stage context) for the trained tiny model."""
    teacher, data = trained_tiny
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher)
    return teacher, export(teacher, ExportConfig(), tmp_path_factory.mktemp("onnx")), ctx


def ops(variant: Variant) -> set[str]:
    return {n.op_type for n in onnx.load(f"{variant.path}/model.onnx").graph.node}


def ops_count(variant: Variant, op_type: str) -> int:
    return [n.op_type for n in onnx.load(f"{variant.path}/model.onnx").graph.node].count(op_type)


def four_bit_tables(model) -> dict[str, tuple]:
    """{packed codes: dims} of the 4-bit tables in an ONNX model."""
    return {
        t.name: tuple(t.dims)
        for t in model.graph.initializer
        if t.name.endswith(FOUR_BIT_CODES) and t.data_type == onnx.TensorProto.UINT8
    }


def agreement(a: Variant, b: Variant, texts=TEXTS) -> float:
    return float(
        (
            load_predictor(a.path, a.format).logits(texts).argmax(-1)
            == load_predictor(b.path, b.format).logits(texts).argmax(-1)
        ).mean()
    )


@pytest.mark.parametrize("optimize", ["none", "fusion"])
def test_export_matches_pytorch(root, tmp_path, optimize):
    child = export(root, ExportConfig(optimize=optimize), tmp_path)
    assert child.lineage == "teacher>onnx" and child.parent_id == root.id and child.format == "onnx"
    if optimize == "fusion":
        assert "Attention" in ops(child)  # ORT's fused attention
    torch_logits = load_predictor(root.path, "hf").logits(TEXTS)
    predictor = load_predictor(child.path, "onnx")
    ort_logits = predictor.logits(TEXTS)
    assert ort_logits.shape == (len(TEXTS), 2)
    np.testing.assert_allclose(ort_logits, torch_logits, atol=1e-4)
    # one text per call (as served) is tokenized on its own path: the same rows, unpadded
    one_at_a_time = np.concatenate([predictor.logits([text]) for text in TEXTS])
    np.testing.assert_allclose(one_at_a_time, torch_logits, atol=1e-4)


def test_residual_layer_norms_stay_split_when_onnx_runtime_loads_the_model(root, tmp_path, monkeypatch):
    """The fused export keeps each residual LayerNorm as Add + LayerNormalization, and the sessions squeezeflow
    makes do not fuse them back into SkipLayerNormalization (the graph ONNX Runtime runs is read back)."""
    import onnxruntime as ort

    from squeezeflow.tasks.runtime import ort_session

    child = export(root, ExportConfig(optimize="fusion"), tmp_path)
    assert "SkipLayerNormalization" not in ops(child) and "LayerNormalization" in ops(child)
    plain_options = ort.SessionOptions

    def options_that_save_the_graph_run():
        options = plain_options()
        options.optimized_model_filepath = str(tmp_path / "as_run.onnx")
        return options

    monkeypatch.setattr(ort, "SessionOptions", options_that_save_the_graph_run)
    ort_session(Path(child.path) / "model.onnx", threads=1)
    as_run = [n.op_type for n in onnx.load(tmp_path / "as_run.onnx").graph.node]
    assert "SkipLayerNormalization" not in as_run and as_run.count("LayerNormalization") == ops_count(
        child, "LayerNormalization"
    )


def test_dynamic_int8_has_integer_ops_and_agrees(trained, tmp_path):
    teacher, onnx_variant, ctx = trained
    int8 = quantize(onnx_variant, "dynamic", QuantizeConfig(), ctx, tmp_path)
    assert int8.lineage == "teacher>onnx>int8-dynamic" and int8.parent_id == onnx_variant.id
    assert ops(int8) & INTEGER_OPS
    assert any(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(f"{int8.path}/model.onnx").graph.initializer)
    assert agreement(onnx_variant, int8) >= 0.9


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantizing_writes_nothing_into_the_parent_directory(trained, tmp_path, monkeypatch, mode):
    """Modes of one parent run at once: a scratch file in the parent's directory would be shared between them."""
    from onnx import shape_inference

    teacher, onnx_variant, ctx = trained
    written = []
    real = shape_inference.infer_shapes_path

    def recording(src, dst="", *args, **kwargs):  # ORT's shape inference, run as usual, its output path noted
        written.append(Path(dst or src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(shape_inference, "infer_shapes_path", recording)
    before = sorted(p.name for p in Path(onnx_variant.path).iterdir())
    quantize(onnx_variant, mode, QuantizeConfig(calibration_examples=16), ctx, tmp_path)
    assert written, "ORT's shape inference was not reached"
    assert not [p for p in written if p.parent == Path(onnx_variant.path)]
    assert sorted(p.name for p in Path(onnx_variant.path).iterdir()) == before


def test_a_mode_is_made_anew_only_when_a_knob_it_reads_changes(trained, tmp_path):
    teacher, onnx_variant, ctx = trained
    first = quantize(onnx_variant, "dynamic", QuantizeConfig(), ctx, tmp_path)
    other_modes_knobs = QuantizeConfig(calibration_method="entropy", qat=QATConfig(max_examples=50))
    assert quantize(onnx_variant, "dynamic", other_modes_knobs, ctx, tmp_path).id == first.id
    assert "qat" not in first.params and "calibration_method" not in first.params
    assert quantize(onnx_variant, "dynamic", QuantizeConfig(per_channel=True), ctx, tmp_path).id != first.id
    assert len(written(tmp_path)) == 2


def test_every_quantize_knob_belongs_to_a_mode():
    # a knob no mode lists would be left out of every variant id: changing it would reuse stale variants
    knobs = set(QuantizeConfig.model_fields) - set(StageBase.model_fields) - {"kind", "modes"}
    assert knobs == {k for listed in MODE_KNOBS.values() for k in listed}


def test_int8_embeddings_shrink_the_word_embedding(trained, tmp_path):
    teacher, fused, ctx = trained
    assert "EmbedLayerNormalization" in ops(fused)
    small = quantize(fused, "dynamic", QuantizeConfig(quantize_embeddings=True), ctx, tmp_path)
    assert "QEmbedLayerNormalization" in ops(small)
    word_embedding = next(
        t
        for t in onnx.load(f"{small.path}/model.onnx").graph.initializer
        if "word_embeddings" in t.name and tuple(t.dims) == (31, 32)
    )
    assert word_embedding.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    assert agreement(fused, small) >= 0.9


@pytest.mark.parametrize("optimize", ["fusion", "none"])
def test_4bit_embeddings_read_back_the_values_they_were_quantized_to(trained, tmp_path, optimize):
    """The packed codes, scales and zero points, decoded by the graph's own ops, give exactly the 4-bit values
    `dequantized_blocks` computes: the fp32 model holding those values in float agrees to 1e-5. Fused, the tables
    feed EmbedLayerNormalization; unfused, plain Gathers."""
    import shutil

    from onnx import numpy_helper

    from squeezeflow.tasks.quantize.codec4 import dequantized_blocks, four_bit_embeddings

    teacher, fused, _ = trained
    parent = fused if optimize == "fusion" else export(teacher, ExportConfig(optimize="none"), tmp_path / "plain")
    for name in ("float_grid", "four_bit"):
        shutil.copytree(parent.path, tmp_path / name)
    model = onnx.load(f"{parent.path}/model.onnx")
    tables = [t for t in model.graph.initializer if "word_embeddings" in t.name or "position_embeddings" in t.name]
    assert len(tables) == 2
    for table in tables:
        table.CopyFrom(numpy_helper.from_array(dequantized_blocks(numpy_helper.to_array(table), 16), table.name))
    onnx.save(model, tmp_path / "float_grid" / "model.onnx")
    four_bit_embeddings(tmp_path / "four_bit" / "model.onnx", 16)

    four_bit = onnx.load(tmp_path / "four_bit" / "model.onnx")
    assert four_bit_tables(four_bit) == {
        "bert.embeddings.word_embeddings.weight_q4": (31, 16),
        "bert.embeddings.position_embeddings.weight_q4": (64, 16),
    }
    assert ("EmbedLayerNormalization" in {n.op_type for n in four_bit.graph.node}) == (optimize == "fusion")
    float_tables = {
        t.name
        for t in four_bit.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.dims[1] == 32
    }
    assert not {name for name in float_tables if "word_embeddings" in name or "position_embeddings" in name}
    np.testing.assert_allclose(
        load_predictor(tmp_path / "four_bit", "onnx").logits(TEXTS),
        load_predictor(tmp_path / "float_grid", "onnx").logits(TEXTS),
        atol=1e-5,
    )


def test_4bit_decoding_of_a_plain_gather_with_an_odd_number_of_blocks(tmp_path):
    """48 values a row in blocks of 16: three zero points a row, packed into two bytes, the last half empty."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from squeezeflow.tasks.quantize.codec4 import dequantized_blocks, four_bit_embeddings

    table = np.random.default_rng(1).normal(0, 0.1, (20, 48)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "lookup.onnx")
    four_bit_embeddings(tmp_path / "lookup.onnx", 16)
    model = onnx.load(tmp_path / "lookup.onnx")
    assert four_bit_tables(model) == {"table_q4": (20, 24)} and "table" not in {t.name for t in model.graph.initializer}
    ids = np.array([0, 7, 19, 7], dtype=np.int64)
    rows = ort.InferenceSession(str(tmp_path / "lookup.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids}
    )[0]
    np.testing.assert_allclose(rows, dequantized_blocks(table, 16)[ids], atol=1e-7)


def test_onnx_runtime_decodes_4bit_tables_once_when_the_session_is_created(trained, tmp_path):
    """The decoding ops read constants only, so ONNX Runtime's constant folding runs them at session creation:
    the optimised graph it runs holds float tables again and no decoding op."""
    import onnxruntime as ort

    _, fused, ctx = trained
    four = quantize(
        fused,
        "dynamic",
        QuantizeConfig(quantize_embeddings=True, embedding_bits=4, embedding_block_size=16),
        ctx,
        tmp_path,
    )
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(f"{four.path}/model.onnx", options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx").graph
    embed = next(n for n in optimized.node if n.op_type == "EmbedLayerNormalization")
    floats = {t.name: tuple(t.dims) for t in optimized.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert floats[embed.input[2]] == (31, 32) and floats[embed.input[3]] == (64, 32)  # word and position tables
    assert not {"Div", "Concat", "Reshape"} & {n.op_type for n in optimized.node}


def test_4bit_blocks_are_a_fixed_point_so_qat_can_train_on_them():
    from squeezeflow.tasks.quantize.codec4 import dequantized_blocks

    table = np.random.default_rng(0).normal(0, 0.05, (50, 64)).astype(np.float32)
    table[3, :16] = 0.0  # an all-zero block
    grid = dequantized_blocks(table, 16)
    assert 0 < np.abs(grid - table).max() < 0.05 / 2
    assert len(np.unique(grid[7, :16])) <= 16
    np.testing.assert_allclose(dequantized_blocks(grid, 16), grid, atol=1e-7)


def test_4bit_embeddings_shrink_the_model_further_and_agree(trained, tmp_path):
    teacher, fused, ctx = trained
    eight = quantize(fused, "dynamic", QuantizeConfig(quantize_embeddings=True), ctx, tmp_path)
    four = quantize(
        fused,
        "dynamic",
        QuantizeConfig(quantize_embeddings=True, embedding_bits=4, embedding_block_size=16),
        ctx,
        tmp_path,
    )
    assert {"EmbedLayerNormalization", "QAttention"} <= ops(four) and four_bit_tables(
        onnx.load(f"{four.path}/model.onnx")
    )
    # per-row data (codes, scales, zero points vs INT8 codes), not the few fixed-size shapes the decoding reads
    word_table_bytes = lambda v: sum(
        len(t.raw_data)
        for t in onnx.load(f"{v.path}/model.onnx").graph.initializer
        if t.name.startswith("bert.embeddings.word_embeddings") and t.data_type != onnx.TensorProto.INT64
    )
    assert word_table_bytes(four) < 0.8 * word_table_bytes(eight)
    assert count_params(four) == pytest.approx(count_params(eight), rel=1e-3)  # the same values, fewer bits each
    assert agreement(fused, four) >= 0.9
    cfg = QuantizeConfig(
        quantize_embeddings=True, embedding_bits=4, embedding_block_size=16, qat={"epochs": 1, "max_examples": 64}
    )
    qat = quantize(fused, "qat", cfg, ctx, tmp_path, source=teacher)
    assert four_bit_tables(onnx.load(f"{qat.path}/model.onnx")) and agreement(fused, qat) >= 0.8


def test_4bit_block_size_must_fit_the_embedding(trained, tmp_path):
    teacher, fused, ctx = trained
    with pytest.raises(ValueError, match="power of two"):
        QuantizeConfig(embedding_block_size=48)
    too_wide = QuantizeConfig(quantize_embeddings=True, embedding_bits=4, embedding_block_size=64)
    for mode in ("dynamic", "qat"):
        with pytest.raises(ModelError, match="embedding_block_size: 64 does not divide the embedding width 32"):
            quantize(fused, mode, too_wide, ctx, tmp_path, source=teacher)
    assert not written(tmp_path)  # nothing half-written


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
@pytest.mark.parametrize("optimize", ["fusion", "none"])
def test_static_int8_runs_integer_kernels_with_fixed_ranges_and_agrees(trained, tmp_path, method, optimize):
    """Static INT8 (no PyTorch source needed) runs the same integer kernels as dynamic INT8, but every activation
    is quantized with a scale and zero point fixed by calibration instead of measured on each call."""
    teacher, fused, ctx = trained
    parent = fused if optimize == "fusion" else export(teacher, ExportConfig(optimize="none"), tmp_path / "plain")
    int8 = quantize(parent, "static", QuantizeConfig(calibration_examples=64, calibration_method=method), ctx, tmp_path)
    assert int8.lineage == "teacher>onnx>int8-static"
    graph = onnx.load(f"{int8.path}/model.onnx").graph
    constants = {t.name for t in graph.initializer}
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert "DynamicQuantizeLinear" not in ops(int8) and quantizers
    assert all(n.input[1] in constants and n.input[2] in constants for n in quantizers)
    assert "MatMulIntegerToFloat" in ops(int8) and ("QAttention" in ops(int8)) == (optimize == "fusion")
    # each bias Add after an integer MatMul is folded into it (input 6): no Add adds a constant vector to its output
    to_float = {n.output[0] for n in graph.node if n.op_type == "MatMulIntegerToFloat"}
    assert any(len(n.input) == 7 for n in graph.node if n.op_type == "MatMulIntegerToFloat")
    assert not [
        n.name for n in graph.node if n.op_type == "Add" and set(n.input) & to_float and set(n.input) & constants
    ]
    assert agreement(parent, int8) >= 0.9
    assert sorted(p.name for p in Path(int8.path).iterdir()) == sorted(p.name for p in Path(parent.path).iterdir())


@pytest.fixture(scope="module")
def untrained_head(tmp_path_factory):
    """The real packaged MiniLM with an untrained 3-class head: its logit margins are small, so static INT8 flips
    labels. Returns (its ONNX export, 90 texts, a StageContext whose train and eval splits are those texts labelled
    with the fp32 model's own predictions: its accuracy on them is exactly 1.0)."""
    import csv

    from squeezeflow.tasks.data import DataConfig
    from squeezeflow.tasks.teacher import ModelConfig, TeacherConfig, make_teacher

    from .conftest import write_tsv

    tmp = tmp_path_factory.mktemp("untrained-head")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo" / "eval.tsv"
    texts = [row[0] for row in csv.reader(demo.open(), delimiter="\t")][1:91]
    placeholder = DataConfig(train=demo, eval=demo)
    teacher = make_teacher(
        ModelConfig(num_labels=3, max_length=64), TeacherConfig(epochs=0.01), placeholder, tmp / "v", seed=7
    )
    onnx_variant = export(teacher, ExportConfig(), tmp / "v")
    rows = list(zip(texts, load_predictor(onnx_variant.path, "onnx").logits(texts).argmax(-1).tolist()))
    # the fallback scores on the validation split: here the same 90 texts
    data = DataConfig(
        train=write_tsv(tmp / "train.tsv", rows),
        eval=write_tsv(tmp / "eval.tsv", rows),
        validation=tmp / "eval.tsv",
    )
    return onnx_variant, texts, StageContext(data=data, num_labels=3, max_length=64, seed=7, teacher=teacher)


def test_static_fallback_excludes_sensitive_nodes_until_within_tolerance(untrained_head, tmp_path):
    """The fallback must keep nodes in float until at most one of the 90 labels differs, then stop; held to zero
    flips with room for only 3 nodes, it must say it could not."""
    onnx_variant, texts, ctx = untrained_head
    naive = quantize(
        onnx_variant,
        "static",
        QuantizeConfig(calibration_examples=16, accuracy_tolerance=None),
        ctx,
        tmp_path / "naive",
    )
    assert agreement(onnx_variant, naive, texts) < 1 - 1.5 / 90  # plain static INT8 really flips 2+ labels here
    quantizable = {
        n.name for n in onnx.load(f"{onnx_variant.path}/model.onnx").graph.node if n.op_type in ("MatMul", "Attention")
    }

    guarded = quantize(
        onnx_variant,
        "static",
        QuantizeConfig(calibration_examples=16, accuracy_tolerance=1.5 / 90),
        ctx,
        tmp_path / "guarded",
    )
    assert guarded.metrics["fallback_tolerance_met"] == 1.0
    excluded = guarded.params["excluded_nodes"]
    assert 1 <= guarded.metrics["fallback_excluded_nodes"] == len(excluded) < len(quantizable)  # stopped once met
    assert set(excluded) <= quantizable and "QuantizeLinear" in ops(guarded)
    assert agreement(onnx_variant, guarded, texts) >= 1 - 1.5 / 90

    strict = QuantizeConfig(calibration_examples=16, accuracy_tolerance=0.0, max_fallback_nodes=3)
    short = quantize(onnx_variant, "static", strict, ctx, tmp_path / "short")
    assert short.metrics["fallback_tolerance_met"] == 0.0 and len(short.params["excluded_nodes"]) == 3


def test_static_fallback_of_early_exit_segments(untrained_head, tmp_path):
    """The same model as per-layer early-exit segments (threshold 0: every input runs all six): the fallback ranks the
    nodes of every segment together, names each `<segment>:<node>`, keeps those in float in their segment's graph
    and stops once at most one label differs; exclude_nodes takes the same names."""
    from squeezeflow.tasks.early_exit import EarlyExitConfig, early_exit

    onnx_variant, texts, ctx = untrained_head
    exits = EarlyExitConfig(thresholds=[0.0], training={"epochs": 0.2, "batch_size": 16})
    fp32 = early_exit(ctx.teacher, 0.0, exits, ctx, tmp_path / "v")
    segments = {path.stem: path for path in sorted(Path(fp32.path, "segments").glob("*.onnx"))}
    assert len(segments) == 6

    def float_nodes(variant: Variant) -> set[str]:
        """The float MatMul / Attention nodes with a weight (the exits' mean pooling, mask x states, has none)."""
        graphs = {stem: onnx.load(f"{variant.path}/segments/{stem}.onnx").graph for stem in segments}
        return {
            f"{stem}:{n.name}"
            for stem, g in graphs.items()
            for n in g.node
            if n.op_type in ("MatMul", "Attention") and n.input[1] in {t.name for t in g.initializer}
        }

    quantizable = float_nodes(fp32)
    naive = quantize(
        fp32, "static", QuantizeConfig(calibration_examples=16, accuracy_tolerance=None), ctx, tmp_path / "v"
    )
    assert agreement(fp32, naive, texts) < 1 - 1.5 / 90 and not float_nodes(naive)

    guarded = quantize(
        fp32, "static", QuantizeConfig(calibration_examples=16, accuracy_tolerance=1.5 / 90), ctx, tmp_path / "v"
    )
    assert guarded.format == "onnx-exit" and guarded.metrics["fallback_tolerance_met"] == 1.0
    excluded = guarded.params["excluded_nodes"]
    assert 1 <= guarded.metrics["fallback_excluded_nodes"] == len(excluded) < len(quantizable)
    assert float_nodes(guarded) == set(excluded) and set(excluded) <= quantizable
    assert agreement(fp32, guarded, texts) >= 1 - 1.5 / 90

    short = quantize(
        fp32,
        "static",
        QuantizeConfig(calibration_examples=16, accuracy_tolerance=0.0, max_fallback_nodes=3),
        ctx,
        tmp_path / "v",
    )
    assert short.metrics["fallback_tolerance_met"] == 0.0 and len(short.params["excluded_nodes"]) == 3

    chosen = sorted(quantizable)[-1]
    kept = quantize(
        fp32,
        "static",
        QuantizeConfig(calibration_examples=16, exclude_nodes=[chosen], accuracy_tolerance=None),
        ctx,
        tmp_path / "v",
    )
    assert float_nodes(kept) == {chosen}
    with pytest.raises(
        ModelError,
        match=r"quantize.exclude_nodes: \['segment_09:Attention_0'\] are not MatMul or Attention nodes of .* "
        r"<segment>:<node>",
    ):
        quantize(
            fp32,
            "static",
            QuantizeConfig(calibration_examples=16, exclude_nodes=["segment_09:Attention_0"]),
            ctx,
            tmp_path / "v",
        )


def test_static_calibration_count_beyond_the_data_is_a_clear_error(trained, tmp_path):
    teacher, onnx_variant, ctx = trained
    with pytest.raises(
        DataError, match=r"quantize.calibration_examples is 5000 but the train split .* has only 216 examples"
    ):
        quantize(onnx_variant, "static", QuantizeConfig(calibration_examples=5000), ctx, tmp_path / "out")
    assert not written(tmp_path / "out")


def test_static_exclude_nodes_must_name_nodes_of_the_graph(trained, tmp_path):
    teacher, onnx_variant, ctx = trained
    typo = QuantizeConfig(calibration_examples=16, exclude_nodes=["/bert/encoder/layer.0/output/dense/MatMull"])
    with pytest.raises(
        ModelError,
        match=r"quantize.exclude_nodes: \['/bert/encoder/layer.0/output/dense/MatMull'\] are not MatMul or Attention "
        r"nodes",
    ):
        quantize(onnx_variant, "static", typo, ctx, tmp_path / "out")
    assert not written(tmp_path / "out")
    kept = QuantizeConfig(
        calibration_examples=16, exclude_nodes=["/bert/encoder/layer.0/output/dense/MatMul"], accuracy_tolerance=None
    )
    int8 = quantize(onnx_variant, "static", kept, ctx, tmp_path / "out")
    assert "/bert/encoder/layer.0/output/dense/MatMul" in {
        n.name for n in onnx.load(f"{int8.path}/model.onnx").graph.node if n.op_type == "MatMul"
    }


def test_calibration_count_of_zero_is_rejected_by_the_config():
    with pytest.raises(ValueError, match="calibration_examples"):
        QuantizeConfig(calibration_examples=0)


@pytest.mark.parametrize("activations, range_op", [("static", "QuantizeLinear"), ("dynamic", "DynamicQuantizeLinear")])
def test_qat_exports_an_integer_graph_close_to_its_parent(trained, tmp_path, activations, range_op):
    teacher, onnx_variant, ctx = trained
    cfg = QuantizeConfig(qat={"epochs": 1, "max_examples": 64, "batch_size": 16, "activations": activations})
    int8 = quantize(onnx_variant, "qat", cfg, ctx, tmp_path, source=teacher)
    assert int8.lineage == "teacher>onnx>int8-qat" and int8.metrics["qat_train_seconds"] > 0
    assert ops(int8) & INTEGER_OPS
    assert range_op in ops(int8) and not ops(int8) & ({"QuantizeLinear", "DynamicQuantizeLinear"} - {range_op})
    assert agreement(onnx_variant, int8) >= 0.8


# static activations: the calibrated ranges of the (unchanged) source are those of the static mode's graph
@pytest.mark.parametrize("activations, same_as", [("static", "static"), ("dynamic", "dynamic")])
def test_qat_keeps_its_starting_weights_when_fine_tuning_hurts_on_held_out_data(
    trained, tmp_path, activations, same_as
):
    """A learning rate that wrecks the model: scored on held-out training examples before and after, QAT must
    export its starting point, which is exactly the static (or dynamic) INT8 of the same parent."""
    teacher, onnx_variant, ctx = trained
    wrecking = QuantizeConfig(
        qat={"epochs": 1, "max_examples": 64, "learning_rate": 0.5, "soft_weight": 0.0, "activations": activations}
    )
    kept = quantize(onnx_variant, "qat", wrecking, ctx, tmp_path, source=teacher)
    assert kept.metrics["qat_validation_accuracy"] == kept.metrics["qat_initial_validation_accuracy"] >= 0.9
    start = quantize(onnx_variant, same_as, QuantizeConfig(accuracy_tolerance=None), ctx, tmp_path)
    np.testing.assert_allclose(
        load_predictor(kept.path, "onnx").logits(TEXTS), load_predictor(start.path, "onnx").logits(TEXTS), atol=1e-5
    )
    gentle = QuantizeConfig(qat={"epochs": 1, "max_examples": 64, "activations": activations})
    tuned = quantize(onnx_variant, "qat", gentle, ctx, tmp_path, source=teacher)
    assert tuned.metrics["qat_validation_accuracy"] >= tuned.metrics["qat_initial_validation_accuracy"]
    assert agreement(onnx_variant, tuned) >= 0.8


# 7-bit weights: with 8-bit ones, CPUs without VNNI add pairs of uint8 x int8 products in saturating int16 and
# drift from the exact integer result the simulation computes
@pytest.mark.parametrize("activation_range", [None, (-2.5, 9.0)], ids=["dynamic", "static"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qat_fake_quantization_computes_what_ort_int8_computes(tmp_path, per_channel, activation_range):
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from squeezeflow.tasks.quantize.activations import static_activations
    from squeezeflow.tasks.quantize.dynamic import ort_dynamic
    from squeezeflow.tasks.quantize.qat import fake_quant_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[3] *= 20  # one row with a much larger range: per-tensor and per-channel scales differ
    x = torch.randn(4, 16) * 3 + 1
    weight, bias = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(weight.T.copy(), "w"), numpy_helper.from_array(bias, "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fp32.onnx")
    cfg = QuantizeConfig(per_channel=per_channel, reduce_range=True)
    ort_dynamic(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", cfg)
    if activation_range is not None:  # a range narrower than x's: clipping is simulated too
        static_activations(tmp_path / "int8.onnx", {"x": activation_range})
        assert "MatMulIntegerToFloat" in {n.op_type for n in onnx.load(tmp_path / "int8.onnx").graph.node}
    int8 = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    simulated = (
        fake_quant_linear(linear, per_channel, reduce_range=True, activation_range=activation_range)(x).detach().numpy()
    )
    exact = linear(x).detach().numpy()
    np.testing.assert_allclose(simulated, int8, atol=1e-3 * np.abs(exact).max())
    assert np.abs(simulated - exact).max() > 1e-3 * np.abs(exact).max()  # and quantization did change the result


def test_torch_dynamic_quantizes_linear_layers(trained, tmp_path):
    teacher, _, ctx = trained
    int8 = quantize(teacher, "torch-dynamic", QuantizeConfig(), ctx, tmp_path)
    assert int8.lineage == "teacher>torch-int8-dynamic" and int8.format == "hf"
    predictor = load_predictor(int8.path, "hf")
    quantized = [m for m in predictor.model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")]
    assert len(quantized) >= 2 * 6  # every encoder Linear (6 per layer) runs int8 kernels
    assert agreement(teacher, int8) >= 0.9


def test_failed_stage_leaves_no_partial_directory(root, tmp_path):
    broken = root.model_copy(update={"path": str(tmp_path / "missing")})
    with pytest.raises(Exception):
        export(broken, ExportConfig(), tmp_path / "out")
    assert not written(tmp_path / "out")


@pytest.mark.parametrize("latency_texts", [5, None])
def test_benchmark_scores_accuracy_and_parity_on_batch_1_calls_as_served(trained, tmp_path, latency_texts):
    from squeezeflow.tasks.data import load_splits
    from squeezeflow.tasks.evaluate import BenchmarkConfig, benchmark

    teacher, onnx_variant, ctx = trained
    int8 = quantize(onnx_variant, "dynamic", QuantizeConfig(), ctx, tmp_path)
    # 5 timed texts: the rest of the eval split is still scored, one text per call; or all 60 timed
    cfg = BenchmarkConfig(threads=1, batch_size=8, warmup=1, rounds=1, latency_texts=latency_texts, measure_rss=False)
    measured = {v.id: v.metrics for v in benchmark([teacher, onnx_variant, int8], ctx.data, 2, cfg)}
    eval_split = load_splits(ctx.data, 2).eval

    def served(variant):
        predictor = load_predictor(variant.path, variant.format)
        return np.concatenate([predictor.logits([text]) for text in eval_split.texts])

    int8_logits, parent_logits = served(int8), served(onnx_variant)
    int8_labels, parent_labels = int8_logits.argmax(-1), parent_logits.argmax(-1)
    assert measured[int8.id]["accuracy"] == pytest.approx((int8_labels == np.array(eval_split.labels)).mean())
    assert measured[int8.id]["parity_agreement"] == pytest.approx((int8_labels == parent_labels).mean())
    # per-call activation ranges: batched logits of the INT8 model would give another largest difference
    assert measured[int8.id]["parity_max_abs"] == pytest.approx(np.abs(int8_logits - parent_logits).max(), abs=1e-6)
    assert measured[teacher.id]["accuracy_drop"] == 0 and measured[teacher.id]["speedup"] == 1
    assert measured[int8.id]["latency_p50_ms"] > 0 and measured[int8.id]["throughput_qps"] > 0
    # the batch policy a server may use rests on this: batched predictions against the one-row ones
    predictor = load_predictor(int8.path, int8.format)
    batched = np.concatenate([predictor.logits(eval_split.texts[i : i + 8]) for i in range(0, 60, 8)]).argmax(-1)
    assert measured[int8.id]["batch_agreement"] == pytest.approx((batched == int8_labels).mean())
    assert measured[onnx_variant.id]["batch_agreement"] == 1.0  # fp32 with padding masked: the same predictions


def test_a_search_trial_benchmark_never_reports_eval_figures(trained):
    from squeezeflow.tasks.evaluate import BenchmarkConfig, benchmark

    teacher, onnx_variant, ctx = trained
    cfg = BenchmarkConfig(threads=1, batch_size=8, warmup=0, rounds=1, latency_texts=3, measure_rss=False)
    measured = benchmark([teacher, onnx_variant], ctx.data, 2, cfg, report_eval=False)
    assert not [k for k in measured[1].metrics if k.startswith("accuracy")]
    assert measured[1].metrics["val_accuracy"] > 0.9 and "val_accuracy_drop" in measured[1].metrics


def test_benchmark_runs_in_a_fresh_process_logs_its_rounds_and_reports_its_failure(trained, tmp_path, caplog):
    from squeezeflow.tasks.evaluate import BenchmarkConfig, benchmark

    teacher, onnx_variant, ctx = trained
    cfg = BenchmarkConfig(threads=1, batch_size=8, warmup=0, rounds=2, latency_texts=3, measure_rss=False)
    with caplog.at_level(logging.INFO, logger="squeezeflow.evaluate"):
        measured = benchmark([teacher, onnx_variant], ctx.data, 2, cfg)
    assert [v.id for v in measured] == [teacher.id, onnx_variant.id]
    assert measured[1].metrics["accuracy"] > 0.9 and measured[1].parent_id == teacher.id
    assert "benchmark round 2/2 done" in caplog.text  # the measuring process's progress reaches this one's log
    broken = onnx_variant.model_copy(update={"id": "onnx-broken", "path": str(tmp_path / "gone")})
    with pytest.raises(
        RuntimeError, match=r"the benchmark process failed \(exit 1\): cannot load onnx-broken \(onnx\) from \S*gone: "
    ):
        benchmark([teacher, broken], ctx.data, 2, cfg)


def test_peak_rss_is_measured_in_the_fresh_process(trained):
    from squeezeflow.tasks.evaluate import peak_rss_mb

    _, onnx_variant, _ = trained
    onnx_rss = peak_rss_mb(onnx_variant, TEXTS, threads=1)
    torch_rss = peak_rss_mb(trained[0], TEXTS, threads=1)
    assert 20 < onnx_rss < torch_rss  # ONNX is served without importing torch
    assert onnx_rss < 600  # the probe must not inherit this (torch-laden) test process's peak


def _lone_embeddings(positions: str):
    """Word + token-type + position lookups, summed and layer-normed, as torch exports BERT's embeddings alone.
    positions "shape": 0..T-1 from the input's shape (BERT); "ids": counted from the token ids (RoBERTa-like)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    tables = {
        "word": rng.normal(size=(20, 8)),
        "position": rng.normal(size=(16, 8)),
        "type": rng.normal(size=(2, 8)),
        "gamma": rng.normal(size=8),
        "beta": rng.normal(size=8),
    }
    weights = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tables.items()]
    weights += [
        numpy_helper.from_array(np.array(x, dtype=np.int64), n)
        for n, x in (("zero", 0), ("one", 1), ("axis", 1), ("axes", [0]))
    ]
    if positions == "shape":
        making = [
            helper.make_node("Shape", ["input_ids"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["length"]),
            helper.make_node("Range", ["zero", "length", "one"], ["range"]),
            helper.make_node("Unsqueeze", ["range", "axes"], ["position_ids"]),
        ]
    else:
        making = [
            helper.make_node("Greater", ["input_ids", "zero"], ["real"]),
            helper.make_node("Cast", ["real"], ["counted"], to=TensorProto.INT64),
            helper.make_node("CumSum", ["counted", "axis"], ["position_ids"]),
        ]
    nodes = making + [
        helper.make_node("Gather", ["word", "input_ids"], ["w"]),
        helper.make_node("Gather", ["type", "token_type_ids"], ["t"]),
        helper.make_node("Add", ["w", "t"], ["wt"]),
        helper.make_node("Gather", ["position", "position_ids"], ["p"]),
        helper.make_node("Add", ["wt", "p"], ["sum"]),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["hidden"], axis=-1, epsilon=1e-12),
    ]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, "T"]) for n in ("input_ids", "token_type_ids")]
    graph = helper.make_graph(
        nodes, "embeddings", ids, [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, None)], weights
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("positions, fuses", [("shape", True), ("ids", False)])
def test_lone_embeddings_fuse_only_where_positions_come_from_the_shape(positions, fuses):
    """A graph holding only embeddings (an embedding exit's) gets EmbedLayerNormalization, which numbers positions
    0..T-1: so only where the graph's own position ids do too, with the same output."""
    import onnxruntime as ort

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {
            "input_ids": np.array([[3, 7, 1, 12, 5]], dtype=np.int64),
            "token_type_ids": np.array([[0, 0, 1, 1, 1]], dtype=np.int64),
        }
        return session.run(None, feed)[0]

    model = _lone_embeddings(positions)
    before = run(model)
    assert fuse_lone_embeddings(model) is fuses
    assert ("EmbedLayerNormalization" in {n.op_type for n in model.graph.node}) is fuses
    np.testing.assert_allclose(run(model), before, atol=1e-5)
