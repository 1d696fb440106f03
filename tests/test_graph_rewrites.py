"""Golden-graph tests of the ONNX rewrites squeezeflow makes itself: the exact nodes a rewrite leaves, on graphs built
by hand, so that a change to a rewrite (or to the ONNX Runtime quantizer feeding it) shows up as a diff of ops."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from squeezeflow.tasks.quantize.activations import static_activations, uint8_scale_zero
from squeezeflow.tasks.quantize.codec4 import four_bit_embeddings
from squeezeflow.tasks.quantize.config import QuantizeConfig
from squeezeflow.tasks.quantize.dynamic import ort_dynamic


def linear_model(path, rows=4, width=8, out=3, seed=0):
    """x [batch, rows, width] -> MatMul(W) -> Add(b) -> y: the shape of every projection in a transformer."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(size=(width, out)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(size=(out,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"), helper.make_node("Add", ["h", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", rows, out])],
        [weight, bias],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return rng


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_dynamic_then_static_activations_golden_graph(tmp_path):
    rng = linear_model(tmp_path / "fp32.onnx")
    ort_dynamic(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", QuantizeConfig())
    assert ops(tmp_path / "int8.onnx") == ["DynamicQuantizeLinear", "Mul", "MatMulInteger", "Cast", "Mul", "Add"]

    static_activations(tmp_path / "int8.onnx", {"x": (-3.0, 3.0)})
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    assert [n.op_type for n in graph.node] == ["QuantizeLinear", "MatMulIntegerToFloat"]
    quantize, matmul = graph.node
    assert list(quantize.input)[0] == "x" and list(matmul.output) == ["y"]  # the bias Add is folded in
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    zero, scale = uint8_scale_zero(-3.0, 3.0)
    assert initializers[quantize.input[1]] == pytest.approx(scale) and initializers[quantize.input[2]] == zero

    x = rng.uniform(-3, 3, size=(2, 4, 8)).astype(np.float32)
    fp32 = ort.InferenceSession(str(tmp_path / "fp32.onnx")).run(None, {"x": x})[0]
    static = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, {"x": x})[0]
    assert np.abs(static - fp32).max() < 0.1 * np.abs(fp32).max()


def test_a_range_missing_from_calibration_is_named(tmp_path):
    linear_model(tmp_path / "fp32.onnx")
    ort_dynamic(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", QuantizeConfig())
    with pytest.raises(Exception, match="no calibrated range for 'x'"):
        static_activations(tmp_path / "int8.onnx", {})


def test_four_bit_embedding_golden_graph(tmp_path):
    """A Gather from a [rows, 64] table becomes: packed uint8 codes → unpacked → dequantized per block → reshaped →
    Gather, every op on constants only (ONNX Runtime folds them once, when the session is created)."""
    table = np.random.default_rng(1).normal(size=(10, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"], name="embed")],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(table, "table")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    four_bit_embeddings(tmp_path / "m.onnx", block_size=32)
    rewritten = onnx.load(str(tmp_path / "m.onnx")).graph
    constants = {t.name for t in rewritten.initializer}
    gather = rewritten.node[-1]
    assert gather.op_type == "Gather" and gather.input[1] == "ids"
    decode = rewritten.node[:-1]
    assert sorted({n.op_type for n in decode}) <= [
        "BitShift",
        "BitwiseAnd",
        "Cast",
        "Concat",
        "Mul",
        "Reshape",
        "Sub",
        "Unsqueeze",
    ]
    produced = set(constants)
    for node in decode:  # every decode op reads constants or what earlier decode ops made: no run-time input
        assert set(node.input) <= produced, node
        produced |= set(node.output)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"ids": np.arange(10)})[0]
    step = (table.max() - table.min()) / 15
    assert np.abs(got - table).max() <= step
