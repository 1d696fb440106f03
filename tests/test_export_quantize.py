"""Export and dynamic INT8 on the tiny BERT: the ONNX graphs run in ORT and agree with PyTorch."""

import numpy as np
import onnx
import pytest

from squeezeflow.tasks.export import ExportConfig, export
from squeezeflow.tasks.quantize import QuantizeConfig, quantize
from squeezeflow.tasks.runtime import load_predictor
from squeezeflow.tasks.variant import Variant

from .conftest import sentiment_rows

TEXTS = [text for text, _ in sentiment_rows(16, seed=3)] + ["an unknownword and a much longer sentence about the film plot acting music"]


@pytest.fixture()
def root(tiny_model_dir) -> Variant:
    return Variant(id="teacher-x", stage="teacher", lineage="teacher", format="hf", path=str(tiny_model_dir))


@pytest.mark.parametrize("optimize", ["none", "fusion"])
def test_export_matches_pytorch(root, tmp_path, optimize):
    child = export(root, ExportConfig(optimize=optimize), tmp_path)
    assert child.lineage == "teacher>onnx" and child.parent_id == root.id and child.format == "onnx"
    ops = {n.op_type for n in onnx.load(f"{child.path}/model.onnx").graph.node}
    if optimize == "fusion":
        assert "Attention" in ops or "MultiHeadAttention" in ops  # ORT's fused attention
    torch_logits = load_predictor(root.path, "hf").logits(TEXTS)
    ort_logits = load_predictor(child.path, "onnx").logits(TEXTS)
    assert ort_logits.shape == (len(TEXTS), 2)
    np.testing.assert_allclose(ort_logits, torch_logits, atol=1e-4)


def test_dynamic_int8_has_integer_ops_and_agrees(root, tmp_path):
    onnx_variant = export(root, ExportConfig(), tmp_path)
    int8 = quantize(onnx_variant, "dynamic", QuantizeConfig(), tmp_path)
    assert int8.lineage == "teacher>onnx>int8-dynamic" and int8.parent_id == onnx_variant.id
    graph = onnx.load(f"{int8.path}/model.onnx").graph
    ops = {n.op_type for n in graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention"}, ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    parent = load_predictor(onnx_variant.path, "onnx").logits(TEXTS)
    child = load_predictor(int8.path, "onnx").logits(TEXTS)
    assert (parent.argmax(-1) == child.argmax(-1)).mean() >= 0.9
    assert np.abs(parent - child).max() < 0.5


def test_failed_stage_leaves_no_partial_directory(root, tmp_path):
    broken = root.model_copy(update={"path": str(tmp_path / "missing")})
    with pytest.raises(Exception):
        export(broken, ExportConfig(), tmp_path / "out")
    assert not any((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else True
