from squeezeflow.tasks.select import SelectionConfig, pareto_front, select
from squeezeflow.tasks.variant import Variant


def v(vid, accuracy, p50, size, drop=None, qps=100.0):
    return Variant(
        id=vid, stage="quantize", lineage=f"teacher>{vid}", format="onnx", path="/nowhere",
        metrics={"accuracy": accuracy, "latency_p50_ms": p50, "size_mb": size, "throughput_qps": qps,
                 "accuracy_drop": 0.90 - accuracy if drop is None else drop},
    )


TABLE = [
    v("teacher", 0.90, 20.0, 90.0),
    v("onnx", 0.90, 8.0, 90.0),
    v("int8", 0.895, 4.0, 23.0),
    v("tiny", 0.80, 1.0, 5.0),
    v("slow-int8", 0.895, 6.0, 23.0),  # dominated by int8
]


def test_pareto_front_drops_dominated_variants():
    front = {x.id for x in pareto_front(TABLE)}
    assert front == {"onnx", "int8", "tiny"}  # teacher is dominated by onnx (same accuracy and size, slower)


def test_fastest_within_accuracy_budget():
    chosen = select(TABLE, SelectionConfig(max_accuracy_drop=0.01))
    assert chosen.champion.id == "int8" and chosen.feasible


def test_objective_size_and_latency_ceiling():
    assert select(TABLE, SelectionConfig(max_accuracy_drop=0.2, objective="size")).champion.id == "tiny"
    assert select(TABLE, SelectionConfig(max_accuracy_drop=0.0, max_latency_ms=10)).champion.id == "onnx"


def test_nothing_feasible_keeps_best_so_far_with_reason():
    chosen = select(TABLE, SelectionConfig(max_accuracy_drop=0.01, max_size_mb=1.0))
    assert not chosen.feasible
    assert chosen.champion.id == "int8"  # one violation (size), the fastest of those
    assert "no variant meets the constraints" in chosen.reason and "size_mb" in chosen.reason
