"""Low-fidelity screening of a search's students. Before a trial trains a new student in full, it distils it on a
share of its training examples and scores that cheap student on validation. Once earlier trials have measured what
full training adds (their students trained both ways), a student that could not keep the accuracy budget even if
it gained the most any of them gained is not trained in full: the trial goes on with the rest of its chain (the
teacher's branches), as it would have scored anyway, since a variant over the budget is never the best."""

from __future__ import annotations

import optuna
from pydantic import Field

from squeezeflow.flows.config import SqueezeConfig
from squeezeflow.tasks.base import StrictModel
from squeezeflow.tasks.data import load_splits
from squeezeflow.tasks.distill import StudentShape, distill_task, student_record, validation_accuracy
from squeezeflow.tasks.variant import StageContext, Variant, finished

# students trained both ways before the first verdict: one could be a fluke
CALIBRATIONS = 2


class Screening(StrictModel):
    fraction: float = Field(gt=0, lt=1, description="Share of a student's training examples in its cheap pass.")
    max_drop: float = Field(ge=0, description="The accuracy budget on validation.")
    gains: list[float] = Field(description="What full training added to each student earlier trials trained both ways.")


def verdict(cheap_drop: float, gains: list[float]) -> float | None:
    """The best drop full training could bring a student to (None while calibrating): its cheap drop less the most
    full training added to any calibrated student (never less than nothing)."""
    if len(gains) < CALIBRATIONS:
        return None
    return cheap_drop - max(0.0, *gains)


def gains_of(trials: list[optuna.trial.FrozenTrial]) -> list[float]:
    """What full training added (validation accuracy) to every student the trials screened and then trained."""
    return [r["full"] - r["cheap"] for t in trials for r in t.user_attrs.get("screen", []) if r.get("full") is not None]


_teacher_accuracy: dict[tuple[str, str], float] = {}  # per process: the teacher is scored once, not per trial


def screen_students(
    cfg: SqueezeConfig, teacher: Variant, ctx: StageContext, screening: Screening
) -> tuple[SqueezeConfig, list[dict]]:
    """`cfg` with the first stage's students that full training could not bring within budget left out, and one
    record per new student (a student already made in full is not screened)."""
    if not cfg.stages or cfg.stages[0].kind != "distill":
        return cfg, []
    stage, out = cfg.stages[0], cfg.artifacts_dir / "variants"
    available = len(load_splits(ctx.data, ctx.num_labels).train)
    examples = max(1, round(min(stage.training.max_examples or available, available) * screening.fraction))
    cheap_stage = stage.model_copy(update={"training": stage.training.model_copy(update={"max_examples": examples})})
    key = (teacher.id, ctx.data_fingerprint)
    if key not in _teacher_accuracy:
        _teacher_accuracy[key] = validation_accuracy(teacher, ctx)
    reference = _teacher_accuracy[key]
    kept, records = [], []
    for shape in stage.students:
        full = student_record(teacher, shape, stage, ctx, out)
        if finished(full):
            kept.append(shape)
            continue
        cheap = validation_accuracy(distill_task(teacher, shape, cheap_stage, ctx, out), ctx)
        best_drop = verdict(reference - cheap, screening.gains)
        keep = best_drop is None or best_drop <= screening.max_drop
        kept += [shape] if keep else []
        records.append(
            {
                "student": shape.model_dump(exclude_none=True),
                "token": full.token,
                "examples": examples,
                "teacher": reference,
                "cheap": cheap,
                "best_drop": best_drop,
                "kept": keep,
                "full": None,
            }
        )
    # no student left: the stage's later siblings (prune, exits on students) get nothing; the teacher's branches run
    stages = [stage.model_copy(update={"students": kept}), *cfg.stages[1:]]
    return cfg.model_copy(update={"stages": stages}), records


def calibrate(records: list[dict], cfg: SqueezeConfig, teacher: Variant, ctx: StageContext) -> list[dict]:
    """The records with the full-trained students' validation accuracy beside their cheap one."""
    stage, out = cfg.stages[0], cfg.artifacts_dir / "variants"
    for record in records:
        if record["kept"]:
            # scored as the cheap one was, not read from the trial's benchmark: a gain across two code paths would
            # carry their difference
            made = finished(student_record(teacher, StudentShape(**record["student"]), stage, ctx, out))
            record["full"] = validation_accuracy(made, ctx) if made else None  # None: its training failed
    return records


def summary(records: list[dict]) -> str:
    """One line for the trial table: each screened student, its cheap drop and the verdict."""

    def one(r: dict) -> str:
        drop = f"cheap drop {100 * (r['teacher'] - r['cheap']):.1f} pt"
        if r["best_drop"] is None:
            return f"{r['token']} kept ({drop}; calibrating)"
        return f"{r['token']} {'kept' if r['kept'] else 'out'} ({drop}, at best {100 * r['best_drop']:.1f})"

    return "; ".join(one(r) for r in records)
