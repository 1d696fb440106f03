"""Training cost and result of the training loop on this machine: distils one student from a teacher variant on a
recipe's data into a fresh directory and prints its training time and validation accuracy. Run it on two commits
(e.g. in a `git worktree`) to compare training code on the same machine.

    python -m bench.train_student configs/trec.yaml artifacts/variants/teacher-668664 --layers 3 --epochs 6
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from squeezeflow.flows.compress import stage_context
from squeezeflow.flows.config import load_config
from squeezeflow.tasks.distill import DistillConfig, StudentShape, distill
from squeezeflow.tasks.evaluate import machine
from squeezeflow.tasks.variant import Variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="the recipe whose data (train and validation split) is used")
    parser.add_argument("teacher", type=Path, help="a teacher variant directory (artifacts/variants/teacher-…)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-examples", type=int, default=None, help="train on this many examples (seeded sample)")
    args = parser.parse_args()
    cfg = load_config(args.recipe)
    teacher = Variant.model_validate_json((args.teacher / "variant.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        ctx = stage_context(cfg, teacher, Path(tmp) / "cache")  # a cold cache: teacher logits computed here
        distill_cfg = DistillConfig(
            students=[{"num_layers": args.layers}],
            training={
                "epochs": args.epochs,
                "learning_rate": args.learning_rate,
                "batch_size": 32,
                "max_examples": args.max_examples,
            },
        )
        student = distill(teacher, StudentShape(num_layers=args.layers), distill_cfg, ctx, Path(tmp) / "variants")
    m = student.metrics
    print(f"machine: {machine()}")
    print(
        f"L{args.layers} student, {args.epochs:g} epochs: training {m['distill_train_seconds']:.1f} s, "
        f"validation accuracy {m['distill_best_validation_score']:.4f}"
    )


if __name__ == "__main__":
    main()
