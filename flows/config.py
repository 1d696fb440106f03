"""The recipe schema: one strict, frozen Pydantic model; YAML is only its serialisation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from squeezeflow.tasks.base import ConfigError, StrictModel
from squeezeflow.tasks.data import DataConfig
from squeezeflow.tasks.evaluate import BenchmarkConfig
from squeezeflow.tasks.select import SelectionConfig
from squeezeflow.tasks.stages import CHAIN, STAGES
from squeezeflow.tasks.teacher import ModelConfig, TeacherConfig
from squeezeflow.tasks.tracking import TrackingConfig


def _stage_choices(schema: dict) -> None:
    """Validation picks a stage by its `kind`; the schema offers the stages as `anyOf`, which Prefect's form renders
    as a choice of typed sections (it shows `oneOf`, pydantic's rendering of a tagged union, as a raw JSON box)."""
    schema["anyOf"] = schema.pop("oneOf")
    schema.pop("discriminator", None)


StageConfig = Annotated[
    Union[tuple(stage.config for stage in CHAIN)],  # noqa: UP007 (a union built from the registry)
    Field(discriminator="kind", json_schema_extra=_stage_choices),
]


STAGE_ORDER = tuple(STAGES)  # the only order a chain may take


class RunnerConfig(StrictModel):
    kind: Literal["threads", "dask"] = Field(
        "threads",
        description="threads: sibling variants in bounded threads of this process. dask: on a Dask cluster through "
        "prefect-dask (a LocalCluster of worker processes, or the scheduler at dask_address).",
    )
    max_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Sibling variants made at once: threads, or the LocalCluster's worker processes. PyTorch-heavy "
        "sections take turns inside one process; ONNX Runtime work overlaps.",
    )
    dask_address: str | None = Field(
        None,
        description="An existing Dask scheduler (e.g. tcp://10.0.0.5:8786) for kind dask; its workers need this "
        "package installed and artifacts_dir on storage they share with this machine.",
    )

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, address: str | None) -> str | None:
        if address is not None and not re.match(r"^(tcp|tls|inproc|ucx)://\S+$", address):
            raise ValueError(f"{address!r} is not a scheduler address (expected e.g. tcp://host:8786)")
        return address

    @model_validator(mode="after")
    def _address_needs_dask(self) -> RunnerConfig:
        if self.dask_address is not None and self.kind != "dask":
            raise ValueError("dask_address is only used with kind: dask")
        return self


class SqueezeConfig(StrictModel):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Recipe name; the MLflow experiment by default."
    )
    seed: int = Field(13, ge=0, description="Seed for sampling, initialisation and training.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to compress and how it reads text.")
    data: DataConfig = Field(description="The train, validation and eval files and their columns.")
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="Fine-tuning the model into the teacher every stage starts from."
    )
    stages: list[StageConfig] = Field(
        default_factory=lambda: [STAGES["export"].config(), STAGES["quantize"].config()],
        description="The chain of stages; each applies to every variant the previous stage produced.",
    )
    benchmark: BenchmarkConfig = Field(
        default_factory=BenchmarkConfig,
        description="How every variant is measured (one fresh process, interleaved rounds).",
    )
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig, description="How the champion is chosen, on the validation split."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Where runs and the registered champion go (MLflow)."
    )
    runner: RunnerConfig = Field(
        default_factory=RunnerConfig, description="Where the stage tasks run: threads here, or a Dask cluster."
    )
    artifacts_dir: Path = Field(Path("artifacts"), description="Where runs, variants and the default MLflow store go.")

    @model_validator(mode="after")
    def _consistent(self) -> SqueezeConfig:
        names = self.data.label_names
        if names is not None and len(names) != self.model.num_labels:
            raise ValueError(f"data.label_names has {len(names)} names but model.num_labels is {self.model.num_labels}")
        if self.teacher.finetune and not self.data.train_has_labels:
            raise ValueError(
                "teacher.finetune needs labels, but data.train_has_labels is false (use an already fine-tuned teacher)"
            )
        kinds = [s.kind for s in self.stages]
        for i, kind in enumerate(kinds):
            if kind == "quantize" and not {"export", "early_exit"} & set(kinds[:i]):
                raise ValueError(
                    f"stages.{i}: quantize works on ONNX variants, so an export (or early_exit) stage must come "
                    f"before it"
                )
            if kind in ("distill", "prune", "early_exit") and "export" in kinds[:i]:
                raise ValueError(f"stages.{i}: {kind} works on PyTorch variants, so it must come before export")
            if kind in kinds[:i]:
                raise ValueError(
                    f"stages.{i}: a second {kind} stage; give one {kind} stage with several values instead "
                    f"(e.g. several students, ratios, thresholds or modes)"
                )
            if i and STAGE_ORDER.index(kind) < STAGE_ORDER.index(kinds[i - 1]):
                raise ValueError(
                    f"stages.{i}: {kind} after {kinds[i - 1]}; stages run in the order {' → '.join(STAGE_ORDER)}"
                )
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or f"squeezeflow-{self.name}"

    @property
    def label_names(self) -> list[str]:
        return self.data.label_names or [f"LABEL_{i}" for i in range(self.model.num_labels)]


def _set(tree: dict, dotted: str, raw: str) -> None:
    """Applies one `--set key.sub=value` override; list items are addressed by index (stages.0.opset=17)."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        if not isinstance(node, dict | list):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:depth])} is a value, not a section with keys")
        if depth == len(keys) - 1:
            break
        if isinstance(node, list):
            if not (key.isdigit() and int(key) < len(node)):
                raise ConfigError(f"--set {dotted}: {'.'.join(keys[: depth + 1])} does not exist")
            node = node[int(key)]
        else:
            if node.get(key) is None:  # a section the recipe leaves out (or sets to null) is created
                node[key] = {}
            node = node[key]
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(node, list):
        if not keys[-1].isdigit() or int(keys[-1]) >= len(node):
            raise ConfigError(f"--set {dotted}: {keys[-1]} is not an index of that list (0..{len(node) - 1})")
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def format_validation_error(source: str, error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        elif e["type"] == "union_tag_invalid":
            kind = e.get("input", {}).get("kind")
            message = f"unknown stage kind {kind!r}; expected one of: distill, prune, early_exit, export, quantize"
        elif "input" in e and not isinstance(e["input"], dict | list) and e["type"] != "missing":
            message += f" (got {e['input']!r})"
        parts.append(f"{where}: {message}")
    return f"{source}: " + "; ".join(parts)


def _absolute(cfg: SqueezeConfig) -> SqueezeConfig:
    """Relative paths resolve against the working directory, once, so a flow run elsewhere sees the same files."""
    data = cfg.data
    base = data.dir.resolve() if data.dir else None
    data = data.model_copy(
        update={
            "dir": base,
            "train": data.path_of("train").resolve() if base is None else data.train,
            "eval": data.path_of("eval").resolve() if base is None else data.eval,
            "validation": data.path_of("validation").resolve() if base is None and data.validation else data.validation,
        }
    )
    model = cfg.model
    if not model.source.startswith("packaged:") and Path(model.source).expanduser().exists():
        model = model.model_copy(update={"source": str(Path(model.source).expanduser().resolve())})
    return cfg.model_copy(update={"data": data, "model": model, "artifacts_dir": cfg.artifacts_dir.resolve()})


def parse_config(tree: Any, source: str = "config", overrides: list[str] | None = None) -> SqueezeConfig:
    tree = apply_overrides(tree, source, overrides)
    try:
        return _absolute(SqueezeConfig.model_validate(tree))
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


def apply_overrides(tree: Any, source: str, overrides: list[str] | None) -> dict:
    """The recipe tree with each `--set key.sub=value` applied."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {type(tree).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        try:
            _set(tree, key.strip(), raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return tree


def load_config(path: str | Path, overrides: list[str] | None = None) -> SqueezeConfig:
    return parse_config(read_recipe(path), str(path), overrides)


def read_recipe(path: str | Path) -> Any:
    """The recipe file's YAML tree (not yet validated); a missing or unreadable file is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return tree if tree is not None else {}


def dump_config(cfg: SqueezeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
