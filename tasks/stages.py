"""The stage registry: every stage a recipe's chain may hold, in the order a chain runs them. The recipe schema, the
Prefect form and the flow read it; a new stage is one module with a `STAGE` and one line here."""

from __future__ import annotations

from . import distill, early_exit, export, prune, quantize
from .base import Stage

CHAIN = (distill.STAGE, prune.STAGE, early_exit.STAGE, export.STAGE, quantize.STAGE)
STAGES: dict[str, Stage] = {stage.kind: stage for stage in CHAIN}
