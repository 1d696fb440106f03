"""The recipe reference (docs/reference.md), generated from the schema's field descriptions so that it cannot drift."""

from __future__ import annotations

import typing
from pathlib import Path
from types import UnionType

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from squeezeflow.flows.config import SqueezeConfig, StageConfig

HEADER = (
    "# Recipe reference\n\n"
    "Every key a recipe may hold, generated from the schema (`squeeze schema --markdown > docs/reference.md`; a test\n"
    "checks that this file matches it). What the stages do and why: [stages.md](stages.md).\n"
)


def _type_name(annotation) -> str:
    """A short, readable name for a field's type: `int`, `list[str]`, `'minmax' | 'entropy'`, a section's name."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, Path):
        value = str(value)
    return f"`{value!r}`" if value not in ("", None) else f"`{value}`"


def _section(title: str, model: type[BaseModel], prefix: str | None = None) -> list[str]:
    lines = [f"\n## {title}\n", "| key | type | default | what it does |", "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((f"{prefix or title}.{name}", annotation))
        else:  # an optional section, e.g. `born_again: BornAgainConfig | None`
            for arg in typing.get_args(annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    nested.append((f"{prefix or title}.{name}", arg))
    for nested_title, nested_model in nested:
        lines += _section(nested_title, nested_model)
    return lines


def _families() -> list[str]:
    """Which stage (and quantize mode) runs on which model family; a refused cell names why, and preflight says so."""
    from squeezeflow.tasks.families import CELLS as cells
    from squeezeflow.tasks.families import FAMILIES, refusal

    lines = [
        "\n## model families\n",
        "What runs on a model of each family (`model_type` in its config); preflight refuses the rest in one line.\n",
        "| family | " + " | ".join(cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for family in FAMILIES:
        marks = ["✓" if refusal(family.model_types[0], *cell.split(":")) is None else "✗" for cell in cells]
        lines.append(f"| {family.name} (`{'`, `'.join(family.model_types)}`) | " + " | ".join(marks) + " |")
    lines.append("\nWhy each ✗, and what to use instead, is in `tasks/families.py` and in the preflight error.")
    return lines


def _search() -> list[str]:
    from squeezeflow.flows.space import Range

    lines = [
        "\n## searching knobs (`squeeze search`)\n",
        "Any knob of any section or stage may be given as `{search: [value, ...]}` (a choice; values may be lists or "
        "sections, e.g. `students: {search: [{num_layers: 2}, {layers: [0, 2, 4]}]}`) or as `{search: {low, high}}` "
        "(a range); a single value sampled for a list knob (thresholds, ratios) is tried as a one-item list. Every "
        "choice and both ends of every range are validated before the first trial. The search flow's form shows "
        "each knob as a value or a search (`squeeze schema --search`).\n",
    ]
    lines += _section("a range, `{search: {...}}`", Range)[1:]
    return lines


def recipe_reference() -> str:
    """The markdown reference of every section and stage of a recipe."""
    lines = [HEADER]
    lines += ["## top level\n", "| key | type | default | what it does |", "|---|---|---|---|"]
    sections = []
    for name, field in SqueezeConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((name, annotation))
            continue
        if name == "stages":  # a list of sections, each described below by its kind
            lines.append(f"| `stages` | list of stages | `[export, quantize]` | {field.description} |")
        else:
            lines.append(f"| `{name}` | {_type_name(annotation)} | {_default(field)} | {field.description or ''} |")
    for name, model in sections:
        lines += _section(name, model)
    lines += _families()
    lines += _search()
    stage_models = typing.get_args(typing.get_args(StageConfig)[0])
    for model in stage_models:
        kind = model.model_fields["kind"].default
        lines += _section(f"stage `{kind}` (in `stages`, with `kind: {kind}`)", model, prefix=kind)
    return "\n".join(lines) + "\n"
