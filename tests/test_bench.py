"""bench/sst2.py: the results.json schema and figures from hand-made measurements, and the peers it builds."""

import json
import re
from pathlib import Path

import onnx
import pytest

from bench.sst2 import (
    CHAMPION_KEYS,
    PEER_KEYS,
    TOP_KEYS,
    VARIANT_KEYS,
    check_document,
    make_peers,
    markdown,
    results_document,
)
from squeezeflow.tasks.data import load_splits
from squeezeflow.tasks.runtime import load_predictor
from squeezeflow.tasks.variant import Variant

from .conftest import make_tiny_config

METRICS = {"accuracy_drop": 0.0, "latency_p99_ms": 1.0, "throughput_qps": 100.0, "params_m": 1.0}


def variant(vid, lineage, stage, accuracy, p50, size, parent=None, **more):
    metrics = {**METRICS, "accuracy": accuracy, "latency_p50_ms": p50, "size_mb": size, "accuracy_drop": 0.9 - accuracy}
    metrics |= more
    return Variant(id=vid, parent_id=parent, stage=stage, lineage=lineage, format="onnx", path="/x", metrics=metrics)


def test_results_document_has_exactly_the_keys_and_the_right_ratios():
    teacher = variant("t", "teacher", "teacher", 0.9, 20.0, 90.0)
    intervals = {"accuracy_ci_low": 0.87, "accuracy_ci_high": 0.915}
    paired = {"accuracy_drop_ci_low": -0.004, "accuracy_drop_ci_high": 0.014}
    champion = variant(
        "c", "teacher>distill[L2]>onnx>int8-dynamic", "quantize", 0.895, 1.0, 9.0, "o", **intervals, **paired
    )
    side_by_side = [
        teacher,
        variant("p1", "peer:torch-quantize-dynamic", "quantize", 0.89, 18.0, 90.0),
        variant("p2", "peer:onnxruntime-fp32", "export", 0.9, 6.0, 90.0),
        variant("p3", "peer:optimum-o2-dynamic-int8", "quantize", 0.89, 4.0, 23.0),
        variant("p4", "peer:olive-cpu-int8", "quantize", 0.89, 3.0, 23.0),
        champion,
    ]
    machine = {"cpu": "test", "cores": 2, "threads": 2, "cpu_flags": "avx2", "libraries": {}}
    search = {"study": "sst2-latency-abc", "trials_completed": 3, "budget_minutes": 25.0, "report": "search.md"}

    def level(users, qps, p99, failures=0):
        return {"users": users, "qps": qps, "p50_ms": p99 / 2, "p99_ms": p99, "requests": 100, "failures": failures}

    serving = {
        "squeezeflow champion": [level(1, 60.0, 9.0), level(2, 80.0, 14.0)],
        "optimum-o2-dynamic-int8": [level(1, 50.0, 12.0), level(2, 55.0, 20.0, failures=2)],
    }
    doc = results_document(machine, 12.5, [teacher, champion], side_by_side, "c", search, serving)
    check_document(doc)
    assert tuple(doc) == TOP_KEYS and tuple(doc["champion"]) == CHAMPION_KEYS
    assert all(tuple(p) == PEER_KEYS for p in doc["peers"]) and all(tuple(v) == VARIANT_KEYS for v in doc["variants"])
    assert [p["name"] for p in doc["peers"]] == [
        "pytorch-fp32",
        "torch-quantize-dynamic",
        "onnxruntime-fp32",
        "optimum-o2-dynamic-int8",
        "olive-cpu-int8",
    ]
    c = doc["champion"]
    assert c["speedup_vs_torch_fp32"] == pytest.approx(20.0)
    assert c["speedup_vs_optimum_dynamic"] == pytest.approx(4.0)
    assert c["speedup_vs_olive"] == pytest.approx(3.0)
    assert c["speedup_vs_best_peer"] == pytest.approx(3.0)
    assert c["size_ratio_vs_teacher"] == pytest.approx(10.0)
    json.dumps(doc)  # serialisable as is
    text = markdown(doc, "python -m bench.sst2 --data-dir d --out o")
    assert "speedup_vs_torch_fp32: 20.00× (goal ≥ 15×): met" in text
    assert "accuracy_drop: 0.50 pt (goal ≤ 1.0 pt): met" in text
    assert "| **squeezeflow champion** `teacher>distill[L2]>onnx>int8-dynamic` | 89.50 % [87.0, 91.5] |" in text
    assert "drop against the teacher on dev: +0.50 points [-0.40, +1.40] (paired)" in text
    assert "| squeezeflow champion | 60.0 / 80.0 | 4 / 7 | 9 / 14 | 0 | 60.0 |" in text  # QPS at p99 <= 10 ms: 60
    assert "| optimum-o2-dynamic-int8 | 50.0 / 55.0 | 6 / 10 | 12 / 20 | 2 | 0.0 |" in text
    assert "CPU flags avx2" in text and "3 trial(s) in a 25-minute budget" in text


def test_check_document_names_what_is_wrong():
    with pytest.raises(ValueError, match="top-level keys"):
        check_document({"machine": {}, "peers": []})


def test_peers_are_built_from_the_teacher_and_run(tmp_path, trained_tiny, monkeypatch):
    import bench.sst2 as sst2

    teacher, data = trained_tiny
    monkeypatch.setattr(
        sst2, "peer_olive", lambda teacher_dir, out: sst2.peer_ort_fp32(teacher_dir, out)
    )  # olive-ai is a bench-only extra
    calibration = load_splits(data, 2).train.texts[:16]
    peers = make_peers(teacher, tmp_path / "peers", calibration)
    assert [p.lineage for p in peers] == [
        "teacher",
        "peer:torch-quantize-dynamic",
        "peer:onnxruntime-fp32",
        "peer:optimum-o2-dynamic-int8",
        "peer:optimum-static-int8",
        "peer:olive-cpu-int8",
    ]
    assert all(Path(p.path).parent.name == teacher.id for p in peers[1:])  # a new teacher gets new peers
    assert {p.params.get("ort_session") for p in peers if p.format == "onnx"} == {"default"}
    static_ops = {n.op_type for n in onnx.load(str(Path(peers[4].path) / "model.onnx")).graph.node}
    assert static_ops & {"QuantizeLinear", "QLinearMatMul"}, static_ops
    eval_split = load_splits(data, 2).eval
    reference = load_predictor(teacher.path, "hf").logits(eval_split.texts).argmax(-1)
    for peer in peers[1:]:
        predicted = load_predictor(peer.path, peer.format, ort_defaults=True).logits(eval_split.texts).argmax(-1)
        assert (predicted == reference).mean() >= 0.9, peer.lineage
    assert make_peers(teacher, tmp_path / "peers", calibration) == peers  # built once, reused


def test_the_bench_plot_shows_the_champion_among_the_peers(tmp_path):
    from bench.sst2 import plot_side_by_side
    from squeezeflow.tasks.variant import Variant

    def measured(vid, lineage, p50, accuracy, mb):
        metrics = {"latency_p50_ms": p50, "val_accuracy": accuracy, "accuracy": accuracy, "size_mb": mb}
        return Variant(id=vid, stage="quantize", lineage=lineage, format="onnx", path="/nowhere", metrics=metrics)

    side_by_side = [
        measured("t", "teacher", 20.0, 0.90, 90.0),
        measured("o", "peer:optimum-o2-dynamic-int8", 5.0, 0.89, 23.0),
        measured("c", "teacher>onnx>int8-static", 3.0, 0.895, 18.0),
    ]
    plot_side_by_side(side_by_side, "c", tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_distils_each_drawn_setting_cheap_and_full(tmp_path, tiny_model_dir, capsys):
    import yaml

    from bench import fidelity

    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["stages"] = [
        {
            "kind": "distill",
            "students": {"search": [{"num_layers": 1}, {"layers": [1]}]},
            "soft_weight": {"search": {"low": 0.2, "high": 0.9}},
            "training": {"epochs": 2, "learning_rate": 3e-3, "batch_size": 16},
        }
    ]
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert fidelity.main([str(path), "--settings", "3", "--fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "3 settings, cheap = 0.25 of the examples: Spearman" in out
    rows = [line for line in out.splitlines() if line[:2] in ("0:", "1:", "2:")]
    assert len(rows) == 3 and all("distill.soft_weight" in line for line in rows)
    for line in rows:  # the cheap student took about a quarter of the full one's optimizer steps
        cheap, full = (int(n) for n in re.findall(r"\((\d+) steps", line))
        assert cheap < full / 2


def test_fidelity_refuses_a_recipe_that_does_not_distil_first(tmp_path, tiny_config):
    import yaml

    from bench import fidelity

    tiny_config["stages"][1]["modes"] = {"search": [["dynamic"], ["static"]]}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    with pytest.raises(SystemExit, match="the first stage must distil"):
        fidelity.compare(path, 3, 0.25)


def test_samplers_runs_each_sampler_in_a_study_of_its_own_on_shared_variants(
    prefect_harness, tmp_path, tiny_model_dir, capsys
):
    import yaml

    from bench import samplers

    tree = make_tiny_config(tmp_path, tiny_model_dir)
    tree["stages"] = [
        {"kind": "export"},
        {"kind": "quantize", "modes": ["dynamic"], "per_channel": {"search": [True, False]}},
    ]
    tree["benchmark"] = {"threads": 1, "warmup": 1, "rounds": 1, "latency_texts": 10, "measure_rss": False}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(tree))
    reuse, out = tmp_path / "shared", tmp_path / "out"
    argv = [str(path), "--reuse", str(reuse), "--out", str(out), "--samplers", "nsga2", "random", "--trials", "2"]
    assert samplers.main([*argv, "--seeds", "1"]) == 0
    runs = json.loads((out / "samplers.json").read_text())["runs"]
    assert [(r["sampler"], len(r["trials"])) for r in runs] == [("nsga2", 2), ("random", 2)]
    assert all(t["speedup"] is None or t["speedup"] > 0 for r in runs for t in r["trials"])
    # a study each, one teacher: fine-tuned by the first search, reused by the second
    assert len(list(out.glob("*/artifacts/search/*.journal"))) == 2
    assert len(list((reuse / "variants").glob("teacher-*"))) == 1
    printed = capsys.readouterr().out
    assert "| nsga2 | 1 | " in printed and "| random | 1 | " in printed
    # run again, it reads the finished study instead of searching anew
    journal = next(out.glob("random-0/artifacts/search/*.journal"))
    size = journal.stat().st_size
    assert samplers.main([*argv, "--seeds", "1", "--samplers", "random"]) == 0
    assert json.loads((out / "samplers.json").read_text())["runs"][0]["trials"] == runs[1]["trials"]
    assert journal.stat().st_size == size
    # --first-seed starts a new study of its own beside the others, on the same teacher
    assert samplers.main([*argv, "--seeds", "1", "--first-seed", "1", "--samplers", "random"]) == 0
    assert [(r["sampler"], r["seed"]) for r in json.loads((out / "samplers.json").read_text())["runs"]] == [
        ("random", 1)
    ]
    assert len(list(out.glob("random-1/artifacts/search/*.journal"))) == 1
    assert len(list((reuse / "variants").glob("teacher-*"))) == 1
