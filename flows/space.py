"""Search spaces in a recipe: any knob may be given as `{search: [choice, ...]}` or `{search: {low, high}}` (with
optional `log` and `step`) instead of a value. A trial's values, put in place, make an ordinary recipe that the
strict schema validates; every choice and both ends of every range are validated before the first trial."""

from __future__ import annotations

import copy
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from squeezeflow.flows.config import SqueezeConfig, parse_config
from squeezeflow.tasks.base import ConfigError, StrictModel
from squeezeflow.tasks.stages import STAGES


class Range(StrictModel):
    low: float = Field(description="Smallest value tried.")
    high: float = Field(description="Largest value tried.")
    log: bool = Field(False, description="Sample on a log scale (learning rates); needs low > 0.")
    step: float | None = Field(None, gt=0, description="Only values low + k·step.")
    integer: bool = Field(False, description="Integers only (set when low and high are both written as integers).")

    @model_validator(mode="before")
    @classmethod
    def _integers(cls, value: Any) -> Any:
        if isinstance(value, dict) and "integer" not in value:
            ends = [value.get("low"), value.get("high")]
            if all(isinstance(x, int) and not isinstance(x, bool) for x in ends):
                value = {**value, "integer": True}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        return self


class Search(StrictModel):
    """What a knob set to `{search: ...}` holds: the values to try, or a range."""

    # a one-value choice is refused where the recipe is read (SearchSpace), with the knob's name
    search: list[Any] | Range = Field(description="Two or more values to choose from, or {low, high, log, step}.")


def _unwrap(annotation: Any) -> Any:
    """The type inside Optional[...] / Annotated[...]: the one a knob's value must have."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _takes_list(path: tuple, tree: dict) -> bool:
    """Whether the knob at `path` holds a list (so a sampled single value is tried as a one-item list)."""
    model: Any = SqueezeConfig
    keys = list(path)
    if keys[:1] == ["stages"]:
        model, keys = STAGES[tree["stages"][keys[1]]["kind"]].config, keys[2:]
    annotation: Any = model
    for key in keys:
        annotation = _unwrap(annotation)
        if isinstance(key, int):
            annotation = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else Any
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and key in annotation.model_fields:
            annotation = annotation.model_fields[key].annotation
        else:
            return False
    return typing.get_origin(_unwrap(annotation)) is list


def _retrains(stage: str | None, keys: tuple) -> bool:
    """Whether a knob's value reaches a training. An exit's threshold, ONNX export and INT8 conversion are built from
    trained models without training (exits are trained once for every threshold; QAT's own knobs do train)."""
    if stage is None:
        return keys[:1] not in (("selection",), ("benchmark",))
    if stage == "early_exit":
        return keys[:1] not in (("thresholds",), ("criterion",))
    if stage == "quantize":
        return keys[:1] == ("qat",)
    return stage != "export"


def _label(value: Any) -> str | int | float | bool | None:
    """A choice as Optuna (and MLflow's params) can hold it: scalars as they are, anything else as compact JSON."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Dimension:
    path: tuple  # keys into the recipe tree
    name: str  # as a person reads it: stage kind, then the knob's keys (early_exit.thresholds)
    spec: list | Range
    as_list: bool
    retrains: bool  # a new value trains a model; otherwise the trial reuses every trained model of an earlier one

    def suggest(self, trial) -> Any:
        if isinstance(self.spec, list):
            labels = [_label(c) for c in self.spec]
            return self.spec[labels.index(trial.suggest_categorical(self.name, labels))]
        r = self.spec
        if r.integer:
            return trial.suggest_int(self.name, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        return trial.suggest_float(self.name, r.low, r.high, step=r.step, log=r.log)

    def value_of(self, param: Any) -> Any:
        """The knob's value from the trial's stored param (a choice's label, or the number)."""
        if isinstance(self.spec, list):
            return self.spec[[_label(c) for c in self.spec].index(param)]
        return param

    def ends(self) -> list[Any]:
        """The values whose validity stands for the whole dimension: every choice, or both ends of the range."""
        if isinstance(self.spec, list):
            return list(self.spec)
        ends = [self.spec.low, self.spec.high]
        return [int(x) for x in ends] if self.spec.integer else ends


def has_search(node: Any) -> bool:
    """Whether a recipe tree holds a `{search: ...}` knob anywhere."""
    if isinstance(node, dict):
        return set(node) == {"search"} or any(has_search(v) for v in node.values())
    return isinstance(node, list) and any(has_search(v) for v in node)


def recipe_config(tree: dict, source: str = "config") -> SqueezeConfig:
    """A recipe tree as a config; a search recipe at every searched knob's first value."""
    return SearchSpace(tree, source).first() if has_search(tree) else parse_config(tree, source)


def _where(path: tuple) -> str:
    return ".".join(str(k) for k in path)


class SearchSpace:
    """The recipe tree with its `{search: ...}` markers, and the dimensions they define."""

    def __init__(self, tree: dict, source: str = "config") -> None:
        self.tree, self.source, self.dimensions = tree, source, []
        self._collect(tree, ())
        if not self.dimensions:
            raise ConfigError(
                f"{source}: nothing to search; give at least one knob as {{search: [values]}} or "
                f"{{search: {{low: L, high: H}}}} (e.g. early_exit thresholds: {{search: {{low: 0.1, high: 0.6}}}})"
            )
        self._check()

    def _collect(self, node: Any, path: tuple) -> None:
        if isinstance(node, dict) and set(node) == {"search"}:
            spec = self._spec(node["search"], f"{_where(path)}.search")
            stage = self.tree["stages"][path[1]].get("kind") if path[:1] == ("stages",) and len(path) > 2 else None
            keys = path[2:] if stage else path
            name = ".".join(map(str, (stage, *keys))) if stage else _where(path)
            self.dimensions.append(Dimension(path, name, spec, _takes_list(path, self.tree), _retrains(stage, keys)))
        elif isinstance(node, dict):
            for key, value in node.items():
                self._collect(value, (*path, key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                self._collect(value, (*path, i))

    def _spec(self, raw: Any, where: str) -> list | Range:
        if isinstance(raw, list):
            if len(raw) < 2:
                raise ConfigError(f"{self.source}: {where}: a choice needs at least two values (or give the value)")
            return raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.source}: {where}: expected a list of values or {{low, high}}, got {raw!r}")
        try:
            return Range.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            at = ".".join([where, *map(str, first["loc"])])
            message = (
                "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            )
            raise ConfigError(f"{self.source}: {at}: {message}") from None

    def recipe(self, values: dict[str, Any]) -> dict:
        """The recipe tree with each dimension set to `values[name]`."""
        tree = copy.deepcopy(self.tree)
        for d in self.dimensions:
            value = values[d.name]
            node = tree
            for key in d.path[:-1]:
                node = node[key]
            node[d.path[-1]] = [value] if d.as_list and not isinstance(value, list) else value
        return tree

    def config(self, values: dict[str, Any]) -> SqueezeConfig:
        return parse_config(self.recipe(values), self.source)

    def _check(self) -> None:
        """Each dimension's every choice (or both ends), with the others at their first, makes a valid recipe. A
        failure is blamed on the value whose change makes it; one no choice of this dimension avoids is not its."""
        first = {d.name: d.ends()[0] for d in self.dimensions}
        for d in self.dimensions:
            errors = {}
            for value in d.ends():
                try:
                    self.config({**first, d.name: value})
                except ConfigError as e:
                    errors[_label(value)] = (value, str(e).removeprefix(self.source + ": "))
            if errors and len(errors) < len(d.ends()):
                value, message = next(iter(errors.values()))
                raise ConfigError(
                    f"{self.source}: {_where(d.path)}: the search value {value!r} makes an invalid recipe: {message}"
                )
        try:
            self.first()
        except ConfigError as e:  # every value of some dimension is bad, or the rest of the recipe is
            raise ConfigError(f"{e} (with every searched knob at its first value)") from None

    def first(self) -> SqueezeConfig:
        """The recipe at every dimension's first value: what preflight checks."""
        return self.config({d.name: d.ends()[0] for d in self.dimensions})

    def fingerprint(self) -> str:
        """Names the study: a changed recipe or space starts a new one, an unchanged one resumes, however its
        directories are spelled (`../data` and `/abs/data` are one study)."""
        tree = copy.deepcopy(self.tree)
        data = tree.get("data")
        for node, key in ((tree, "artifacts_dir"), (data, "dir")):
            if isinstance(node, dict) and isinstance(node.get(key), str | Path):
                node[key] = str(Path(node[key]).resolve())
        return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:10]
