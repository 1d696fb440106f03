"""The small record that flows between stages: what a model variant is, where it lives, how it was made."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .data import DataConfig, data_fingerprint
from .progress import making_now

log = logging.getLogger("squeezeflow.variant")
Stage = Literal["teacher", "distill", "prune", "early_exit", "export", "quantize"]
Format = Literal["hf", "onnx", "onnx-exit"]  # onnx-exit: per-segment ONNX graphs with early exits

# Files that hold a variant's weights; tokenizer and config files are the same for every variant.
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".onnx.data")


class Variant(BaseModel):
    """One node of the variant tree. Tasks take and return these, never live models or sessions."""

    model_config = ConfigDict(frozen=True)

    id: str
    parent_id: str | None = None
    stage: Stage
    lineage: str = Field(description="Lineage tokens joined by '>', e.g. teacher>onnx>int8-dynamic.")
    params: dict[str, Any] = Field(default_factory=dict)
    format: Format
    path: str = Field(description="Directory with the model (save_pretrained or model.onnx) and its tokenizer.")
    metrics: dict[str, float] = Field(default_factory=dict)
    content_sha256: str | None = Field(
        None, description="SHA-256 of the stored files, checked before the variant is reused."
    )
    made_at: float | None = Field(None, description="When its files were complete (Unix time).")
    made_seconds: float | None = Field(None, description="How long its stage took to make it, training included.")

    @property
    def token(self) -> str:
        return self.lineage.rsplit(">", 1)[-1]

    def with_metrics(self, **metrics: float) -> Variant:
        return self.model_copy(update={"metrics": {**self.metrics, **metrics}})


class StageContext(BaseModel):
    """What a stage may need besides its parent: the data, the label count, the seed and the root teacher."""

    model_config = ConfigDict(frozen=True)

    data: DataConfig
    num_labels: int
    max_length: int
    seed: int
    teacher: Variant | None = None
    cache_dir: Path | None = Field(
        None, description="Where stages keep reusable intermediate results (teacher logits)."
    )

    @property
    def data_fingerprint(self) -> str:
        return data_fingerprint(self.data)


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a variant's bytes: part of every variant id, so an upgrade recomputes
    instead of reusing stale results. squeezeflow's own code enters through `code_fingerprint` instead."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "torch-pruning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


PACKAGE_ROOT = Path(__file__).parent


# Read with a regex, not ast.parse: CPython 3.11's parser is not thread-safe ("AST constructor recursion depth
# mismatch") and Prefect runs stages in threads while torch and others parse too. Over-matching only rebuilds more.
_IMPORT_FROM = re.compile(r"^\s*from\s+(\.+|squeezeflow\.tasks\.?)([\w.]*)\s+import\s+(\([^)]*\)|[^\n]*)", re.M)


def module_file(name: str) -> Path | None:
    """The source file of `name`, a dotted module of this package (e.g. "quantize.static"), or None."""
    base = PACKAGE_ROOT.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _project_imports(name: str) -> set[str]:
    """The modules of this package (dotted, e.g. "quantize.static") that module `name` imports, at its top or inside a
    function; a submodule brings its package's __init__ along, as Python runs it first."""
    file = module_file(name)
    package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for dots, base, imported in _IMPORT_FROM.findall(file.read_text(encoding="utf-8")):
        if dots.startswith("."):
            if len(dots) - 1 > len(package):
                continue  # above this package
            anchor = package[: len(package) - (len(dots) - 1)]
        else:
            anchor = []
        parts = anchor + ([base] if base else [])
        names = (
            [".".join(parts)]
            if base
            else [".".join([*parts, part.split(" as ")[0].strip()]) for part in imported.strip("()").split(",")]
        )
        for candidate in names:
            while candidate:  # a module, and the packages it sits in
                if module_file(candidate):
                    found.add(candidate)
                candidate = candidate.rpartition(".")[0]
    return found - {name}


@cache
def code_fingerprint(module: str) -> str:
    """A hash of the source of `module` (a module of this package, e.g. "quantize") and of every module of the package
    it imports, directly or not: part of the id of what that stage makes, so editing a stage's code, or a helper it
    uses, rebuilds that stage's variants and their subtrees, and no others."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(_project_imports(name) - seen)
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode() + b"\0" + module_file(name).read_bytes())
    return digest.hexdigest()[:16]


def variant_id(
    lineage: str, params: dict[str, Any], parent_id: str | None = None, *, made_by: str, data: str | None = None
) -> str:
    """A readable, stable id: the last lineage token plus a short hash of the parent, lineage, knobs, library
    versions, the code of the module `made_by` (see code_fingerprint) and, for a stage that reads the train or
    validation data, their fingerprint. Stage outputs are stored by id, so the id is also the stage's cache key."""
    key = [parent_id, lineage, params, library_versions(), code_fingerprint(made_by), data]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    slug = lineage.rsplit(">", 1)[-1].replace("[", "-").replace("]", "").replace(".", "")
    return f"{slug}-{digest[:6]}"


def derive(
    parent: Variant,
    *,
    stage: Stage,
    token: str,
    params: dict[str, Any],
    format: Format,
    out_root: Path,
    data: str | None = None,
) -> Variant:
    """The child record of `parent` made by `stage` (the module of that name), to be written to `out_root/<id>`;
    `token` is its lineage token (e.g. `int8-dynamic`); `data` the data fingerprint, if the stage reads the data."""
    lineage = f"{parent.lineage}>{token}"
    vid = variant_id(lineage, params, parent.id, made_by=stage, data=data)
    return Variant(
        id=vid,
        parent_id=parent.id,
        stage=stage,
        lineage=lineage,
        params=params,
        format=format,
        path=str(Path(out_root) / vid),
    )


def weight_files(path: str | Path) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def size_on_disk_mb(path: str | Path) -> float:
    """Bytes of the weight files / 1e6 (the MLflow `size_mb` metric)."""
    return sum(p.stat().st_size for p in weight_files(path)) / 1e6


def content_hash(path: str | Path) -> str:
    """SHA-256 over the variant's files (names and bytes) but its record, for cache keys and provenance."""
    digest = hashlib.sha256()
    root = Path(path)
    skipped = (Path(RECORD), Path(SEAL))  # what is written about the files, after them
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root) not in skipped):
        digest.update(str(file.relative_to(root)).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


RECORD = "variant.json"


def finished(child: Variant) -> Variant | None:
    """The stored record of `child` when an earlier run already made it (stage results are kept by id) and its files
    still hash to what was recorded; otherwise None, so that it is made again (with a warning if it was damaged)."""
    record = Path(child.path) / RECORD
    if not record.is_file():
        return None
    try:
        stored = Variant.model_validate_json(record.read_text())
    except ValueError:
        log.warning("variant %s: its record %s is unreadable; making it again", child.id, record)
        return None
    if stored.content_sha256 != content_hash(child.path):
        log.warning(
            "variant %s: its files in %s do not match their recorded hash; making it again", child.id, child.path
        )
        return None
    return stored


SEAL = ".sha256"  # a cache entry's recorded hash: inside a directory, beside a file


def _seal_of(path: Path) -> Path:
    return path / SEAL if path.is_dir() else Path(f"{path}{SEAL}")


def _digest(path: Path) -> str:
    return content_hash(path) if path.is_dir() else file_fingerprint(path)


def seal(path: str | Path) -> None:
    """Records the hash of a finished cache entry (a file or a directory) beside it, for `intact` to check."""
    _seal_of(Path(path)).write_text(_digest(Path(path)))


def intact(path: str | Path) -> bool:
    """Whether a cache entry exists and still hashes to what `seal` recorded; a damaged or unsealed one is reported
    (it is then made again by the caller)."""
    path, recorded = Path(path), _seal_of(Path(path))
    if not path.exists():
        return False
    if recorded.is_file() and recorded.read_text() == _digest(path):
        return True
    log.warning("cached %s does not match its recorded hash; making it again", path)
    return False


@contextmanager
def making(child: Variant) -> Iterator[Variant | None]:
    """The stored `child` if an earlier run made it; else None, with `child` claimed until the block ends, so that
    threads, Dask workers and concurrent runs make it once: a second maker waits, then finds it made."""
    if done := finished(child):
        yield done
        return
    with exclusive(Path(child.path)):
        _remove_stale_scratch(Path(child.path))
        _started[child.path] = time.time()
        token = making_now.set(child.lineage)
        try:
            yield finished(child)
        finally:
            making_now.reset(token)
            _started.pop(child.path, None)


_started: dict[str, float] = {}  # variant path -> when its maker began (read by save_record)


def _remove_stale_scratch(final: Path) -> None:
    """Scratch directories of `final` left by a maker that died (kill -9, a lost Dask worker): makers of one variant
    take turns under its lock, so any that exists while we hold it is stale. They never had a record; this frees the
    disk."""
    for scratch in final.parent.glob(f".{final.name}.*"):
        if scratch.is_dir():
            log.warning("removing %s, left by a maker of %s that died", scratch.name, final.name)
            shutil.rmtree(scratch, ignore_errors=True)


def save_record(directory: Path, variant: Variant) -> Variant:
    """Writes the record, with the hash of the directory's files, last, inside the staged directory, so only
    complete variants have one."""
    now = time.time()
    began = _started.get(variant.path)
    variant = variant.model_copy(
        update={
            "content_sha256": content_hash(directory),
            "made_at": now,
            "made_seconds": None if began is None else round(now - began, 3),
        }
    )
    (Path(directory) / RECORD).write_text(variant.model_dump_json(indent=2))
    return variant


def save_hf_variant(variant: Variant, model, tokenizer) -> Variant:
    """Writes a PyTorch variant (safetensors, tokenizer, record) to its directory, atomically."""
    with staged_dir(Path(variant.path)) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        return save_record(scratch, variant)


def file_fingerprint(*paths: str | Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """One maker at a time for `target`, across threads and processes (Dask workers share artifacts_dir): a
    lock file beside it. The maker checks again inside, so the second one finds the first one's result."""
    from filelock import FileLock

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        yield


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yields a scratch directory that becomes `final` only if the block succeeds: no half-written variants."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    scratch.rename(final)
