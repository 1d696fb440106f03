from squeezeflow.tasks.select import SelectionConfig, beats, pareto_front, select
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


def test_a_challenger_must_beat_the_registered_champion_by_a_margin_and_never_replaces_itself():
    cfg = SelectionConfig(max_accuracy_drop=0.01, objective="latency")
    registered = v("champion-v3", 0.9, 1.0, 10).model_copy(update={"params": {"registered_version": "3", "variant_id": "int8-a"}})
    assert beats(v("int8-b", 0.9, 0.9, 10), registered, cfg)
    assert not beats(v("int8-b", 0.9, 0.99, 10), registered, cfg)  # 1 % faster is within timing noise
    assert not beats(v("int8-b", 0.9, 1.2, 10), registered, cfg)
    # the same variant, timed faster this once, is not a better model
    assert not beats(v("int8-a", 0.9, 0.5, 10), registered, cfg)
    # a feasible challenger replaces an incumbent that breaks the accuracy budget, even if slower
    broken = registered.model_copy(update={"metrics": {**registered.metrics, "accuracy_drop": 0.05}})
    assert beats(v("int8-b", 0.9, 2.0, 10), broken, cfg)
