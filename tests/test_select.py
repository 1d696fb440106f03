from squeezeflow.tasks.select import SelectionConfig, beats, pareto_front, select
from squeezeflow.tasks.variant import Variant


def v(vid, accuracy, p50, size, drop=None, qps=100.0, spread=0.0):
    """A measured variant whose validation figures are `accuracy` and `drop`; its eval figures say the opposite, so a
    choice that read them would go wrong."""
    return Variant(
        id=vid,
        stage="quantize",
        lineage=f"teacher>{vid}",
        format="onnx",
        path="/nowhere",
        metrics={
            "val_accuracy": accuracy,
            "latency_p50_ms": p50,
            "size_mb": size,
            "throughput_qps": qps,
            "val_accuracy_drop": 0.90 - accuracy if drop is None else drop,
            "latency_spread_ms": spread,
            "accuracy": 1.0 - accuracy,
            "accuracy_drop": accuracy - 0.90,
        },
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
    registered = v("champion-v3", 0.9, 1.0, 10).model_copy(
        update={"params": {"registered_version": "3", "variant_id": "int8-a"}}
    )
    assert beats(v("int8-b", 0.9, 0.9, 10), registered, cfg)
    assert not beats(v("int8-b", 0.9, 0.99, 10), registered, cfg)  # 1 % faster is within timing noise
    assert not beats(v("int8-b", 0.9, 1.2, 10), registered, cfg)
    # the same variant, timed faster this once, is not a better model
    assert not beats(v("int8-a", 0.9, 0.5, 10), registered, cfg)
    # a feasible challenger replaces an incumbent that breaks the accuracy budget, even if slower
    broken = registered.model_copy(update={"metrics": {**registered.metrics, "val_accuracy_drop": 0.05}})
    assert beats(v("int8-b", 0.9, 2.0, 10), broken, cfg)


def test_latencies_within_the_round_to_round_spread_are_ties_won_by_validation_accuracy_then_size():
    cfg = SelectionConfig(max_accuracy_drop=0.02)
    exits = v("early-exit", 0.885, 2.0, 24.0, spread=0.5)
    plain = v("int8", 0.895, 2.3, 23.0, spread=0.2)
    assert select([v("teacher", 0.90, 20.0, 90.0), exits, plain], cfg).champion.id == "int8"
    steady = exits.model_copy(update={"metrics": {**exits.metrics, "latency_spread_ms": 0.1}})
    assert select([v("teacher", 0.90, 20.0, 90.0), steady, plain], cfg).champion.id == "early-exit"
    same = v("smaller", 0.895, 2.2, 20.0, spread=0.2)
    assert select([v("teacher", 0.90, 20.0, 90.0), plain, same], cfg).champion.id == "smaller"
    # nor does a challenger within the spread replace the registered champion
    registered = plain.model_copy(update={"id": "champion-v1", "params": {"variant_id": "int8"}})
    assert not beats(exits, registered, cfg) and beats(
        steady.model_copy(update={"metrics": {**steady.metrics, "latency_p50_ms": 1.0}}), registered, cfg
    )
    # a challenger tied on latency wins as it would inside a run: on validation accuracy, then on a clearly smaller size
    assert beats(v("sharper", 0.9, 2.4, 30.0, spread=0.2), registered, cfg)
    assert beats(v("lighter", 0.895, 2.4, 18.0, spread=0.2), registered, cfg)
    assert not beats(v("a-bit-lighter", 0.895, 2.4, 22.8, spread=0.2), registered, cfg)
