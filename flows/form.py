"""The recipe as the compress flow's parameter: the same settings as `SqueezeConfig`, with the chain as one optional
section per stage in the order stages run, because Prefect's run form renders an optional typed section as fields
but a list of stage variants as a raw JSON box. A recipe (YAML or JSON, with its `stages` list) is accepted too."""

from __future__ import annotations

import functools
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from squeezeflow.flows.config import STAGE_ORDER, SqueezeConfig, format_validation_error
from squeezeflow.flows.space import Search
from squeezeflow.tasks.base import ConfigError, StrictModel
from squeezeflow.tasks.stages import STAGES


class _Sections(StrictModel):
    model_config = ConfigDict(title="stages")

    def as_list(self) -> list[dict[str, Any]]:
        return [getattr(self, kind).model_dump(mode="json") for kind in STAGES if getattr(self, kind)]


# the chain: every section that is set runs, in this order, on every variant the one before it made
StageSections = create_model(
    "StageSections",
    __base__=_Sections,
    **{kind: (stage.config | None, Field(None, description=stage.summary)) for kind, stage in STAGES.items()},
)


def _recipe_fields() -> dict[str, Any]:
    fields = {}
    for name, field in SqueezeConfig.model_fields.items():
        if name == "stages":
            fields[name] = (StageSections, Field(default_factory=StageSections, description=field.description))
        else:
            fields[name] = (field.annotation, field)
    return fields


class _RecipeBase(StrictModel):
    @model_validator(mode="before")
    @classmethod
    def _from_recipe(cls, value: Any) -> Any:
        """A validated SqueezeConfig, or a recipe tree whose `stages` is the recipe's list, become the form's shape."""
        if isinstance(value, SqueezeConfig):
            value = value.model_dump(mode="json")
        if isinstance(value, dict) and isinstance(value.get("stages"), list):
            sections: dict[str, Any] = {}
            for i, stage in enumerate(value["stages"]):
                kind = stage.get("kind") if isinstance(stage, dict) else None
                if kind not in STAGE_ORDER:
                    raise ValueError(
                        f"stages.{i}: unknown stage kind {kind!r}; expected one of {', '.join(STAGE_ORDER)}"
                    )
                if kind in sections:
                    raise ValueError(f"stages.{i}: a second {kind} stage; give one {kind} stage")
                sections[kind] = stage
            value = {**value, "stages": sections}
        return value

    def to_tree(self) -> dict[str, Any]:
        """The recipe tree, with its `stages` as the list that runs."""
        tree = self.model_dump(mode="json")
        tree["stages"] = [tree["stages"][kind] for kind in STAGES if tree["stages"].get(kind)]
        return tree

    def to_config(self) -> SqueezeConfig:
        """The validated recipe (cross-field checks included); a mistake is a one-line ConfigError."""
        try:
            return SqueezeConfig.model_validate(self.to_tree())
        except ValidationError as e:
            raise ConfigError(format_validation_error("config", e)) from None


Recipe: type[BaseModel] = create_model("Recipe", __base__=_RecipeBase, **_recipe_fields())


def _searchable_type(annotation: Any) -> Any:
    """A section (or an optional one) becomes its searchable self; any other type stays as it is."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return searchable(annotation)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return searchable(inner) | None
    return annotation


def _as_json(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


@functools.cache
def searchable(model: type[BaseModel]) -> type[BaseModel]:
    """`model` with every knob also accepting `{search: ...}` (sections recursively): the search flow's form.
    Values are only shaped here; the search space checks them, and each trial's recipe meets the strict schema."""
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name == "kind":  # a stage's tag is not a knob
            fields[name] = (field.annotation, field)
            continue
        default = (
            Field(
                default_factory=lambda make=field.default_factory: _as_json(make()),
                validate_default=True,
                description=field.description,
            )
            if field.default_factory
            else Field(field.default, description=field.description)
        )
        fields[name] = (_searchable_type(field.annotation) | Search, default)
    base = _RecipeBase if issubclass(model, _RecipeBase) else StrictModel
    return create_model(f"Searchable{model.__name__}", __base__=base, **fields)


# the search flow's parameter: a recipe in which any knob may be {search: [values]} or {search: {low, high}}
SearchRecipe = searchable(Recipe)
