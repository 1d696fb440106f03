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

from .conftest import written


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
    with (edited_package / "quantize" / "codec4.py").open("a") as f:  # a module inside the stage's package
        f.write("\n# an edit\n")
    after = fingerprints()
    assert [s for s in STAGES if after[s] != before[s]] == ["quantize"]
    with (edited_package / "training.py").open("a") as f:  # the training loop: every stage that trains
        f.write("\n# an edit\n")
    again = fingerprints()
    assert [s for s in STAGES if again[s] != after[s]] == ["teacher", "distill", "prune", "early_exit", "quantize"]


def test_fingerprints_computed_by_many_threads_at_once_agree_with_one_thread():
    # Prefect runs sibling stages in threads: the fingerprint must not depend on who computes it first
    from concurrent.futures import ThreadPoolExecutor

    expected = fingerprints()
    for _ in range(5):
        code_fingerprint.cache_clear()
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(code_fingerprint, STAGES * 4))
        assert got == [expected[s] for s in STAGES * 4]


def test_a_code_change_in_one_stage_rebuilds_only_its_subtree(trained_tiny, tmp_path, edited_package):
    teacher, data = trained_tiny
    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher)
    onnx_variant = export(teacher, ExportConfig(), tmp_path)
    int8 = quantize(onnx_variant, "dynamic", QuantizeConfig(), ctx, tmp_path)
    stamp = (Path(onnx_variant.path) / "variant.json").stat().st_mtime_ns

    with (edited_package / "quantize" / "dynamic.py").open("a") as f:
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


def test_damaged_cached_teacher_logits_and_exits_are_made_again(trained_tiny, tmp_path, caplog):
    import numpy as np

    from squeezeflow.tasks.distill import teacher_logits
    from squeezeflow.tasks.early_exit import HEADS_FILE, EarlyExitConfig, exits_dir, train_exits

    teacher, data = trained_tiny
    texts = ["a fine film", "an awful plot"]
    first = teacher_logits(teacher.path, texts, 32, tmp_path / "cache")
    cached = next((tmp_path / "cache").glob("teacher-logits-*.npy"))
    cached.write_bytes(cached.read_bytes()[:40])  # truncated: np.load would fail, or read garbage
    with caplog.at_level(logging.WARNING, logger="squeezeflow.variant"):
        np.testing.assert_allclose(teacher_logits(teacher.path, texts, 32, tmp_path / "cache"), first)
    assert f"cached {cached} does not match its recorded hash; making it again" in caplog.text

    ctx = StageContext(data=data, num_labels=2, max_length=32, seed=7, teacher=teacher)
    cfg = EarlyExitConfig(thresholds=[0.3], training={"epochs": 0.2, "batch_size": 16})
    trained = train_exits(teacher, cfg, ctx, tmp_path / "v")
    assert trained == exits_dir(teacher, cfg, ctx, tmp_path / "v")
    heads = trained / HEADS_FILE
    heads.write_bytes(b"not what was written")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="squeezeflow.variant"):
        train_exits(teacher, cfg, ctx, tmp_path / "v")
    assert f"cached {trained} does not match its recorded hash" in caplog.text
    assert heads.read_bytes() != b"not what was written"


def test_a_full_disk_while_saving_leaves_nothing_that_a_later_run_would_trust(trained_tiny, tmp_path, monkeypatch):
    """The disk fills up in the middle of writing a variant: the error reaches the caller, no directory (or scratch
    copy) is left under the variant's id, and the next attempt makes it whole."""
    import errno

    import squeezeflow.tasks.export as export_module

    teacher, _ = trained_tiny
    real = export_module.export_onnx

    def full_disk(source, out, cfg):
        real(source, out, cfg)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "export_onnx", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export(teacher, ExportConfig(), tmp_path)
    assert written(tmp_path) == []
    monkeypatch.setattr(export_module, "export_onnx", real)
    made = export(teacher, ExportConfig(), tmp_path)
    assert finished(made) == made
