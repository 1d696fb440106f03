"""Variant ids cover the code and the data that made a variant; a stored variant is trusted only while its files
hash to what was recorded."""

import logging
import shutil
from pathlib import Path

import pytest

from squeezeflow.tasks import variant as variant_module
from squeezeflow.tasks.export import ExportConfig, export
from squeezeflow.tasks.quantize import QuantizeConfig, quantize
from squeezeflow.tasks.runtime import load_predictor
from squeezeflow.tasks.variant import StageContext, code_fingerprint, finished


@pytest.fixture()
def edited_package(tmp_path, monkeypatch):
    """A copy of the package's source that the test may edit, read by code_fingerprint instead of the real one."""
    copy = tmp_path / "tasks"
    shutil.copytree(variant_module.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(variant_module, "PACKAGE_ROOT", copy)
    code_fingerprint.cache_clear()
    yield copy
    code_fingerprint.cache_clear()


STAGES = ("teacher", "distill", "prune", "early_exit", "export", "quantize")


def fingerprints() -> dict[str, str]:
    code_fingerprint.cache_clear()
    return {stage: code_fingerprint(stage) for stage in STAGES}


def test_a_stage_fingerprint_covers_its_module_and_what_it_imports_from_the_package(edited_package):
    before = fingerprints()
    with (edited_package / "quantize.py").open("a") as f:
        f.write("\n# an edit\n")
    after = fingerprints()
    assert [s for s in STAGES if after[s] != before[s]] == ["quantize"]
    with (edited_package / "training.py").open("a") as f:  # the training loop: every stage that trains
        f.write("\n# an edit\n")
    again = fingerprints()
    assert [s for s in STAGES if again[s] != after[s]] == ["teacher", "distill", "prune", "early_exit", "quantize"]


def test_a_code_change_in_one_stage_rebuilds_only_its_subtree(trained_tiny, tmp_path, edited_package):
    teacher, data = trained_tiny
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher)
    onnx_variant = export(teacher, ExportConfig(), tmp_path)
    int8 = quantize(onnx_variant, "dynamic", QuantizeConfig(), ctx, tmp_path)
    stamp = (Path(onnx_variant.path) / "variant.json").stat().st_mtime_ns

    with (edited_package / "quantize.py").open("a") as f:
        f.write("\n# an edit\n")
    code_fingerprint.cache_clear()
    assert export(teacher, ExportConfig(), tmp_path).id == onnx_variant.id  # the parent is reused, untouched
    assert (Path(onnx_variant.path) / "variant.json").stat().st_mtime_ns == stamp
    rebuilt = quantize(onnx_variant, "dynamic", QuantizeConfig(), ctx, tmp_path)
    assert rebuilt.id != int8.id and (Path(rebuilt.path) / "variant.json").is_file()


def test_a_damaged_stored_variant_is_made_again_with_a_warning(trained_tiny, tmp_path, caplog):
    teacher, _ = trained_tiny
    made = export(teacher, ExportConfig(), tmp_path)
    graph = Path(made.path) / "model.onnx"
    assert finished(made) == made
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # a killed copy, a full disk
    with caplog.at_level(logging.WARNING, logger="squeezeflow.variant"):
        assert finished(made) is None
        again = export(teacher, ExportConfig(), tmp_path)
    assert "do not match their recorded hash; making it again" in caplog.text
    assert again.id == made.id and finished(again) == again
    load_predictor(again.path, "onnx").logits(["a fine film"])
