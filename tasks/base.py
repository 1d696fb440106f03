"""What every stage shares: the strict config base class and the user-error type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A frozen config model that rejects unknown keys, so a typo in a YAML recipe is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SqueezeError(Exception):
    """A mistake in the user's config, data or model: shown as one line, never as a traceback."""


class ConfigError(SqueezeError):
    pass


class DataError(SqueezeError):
    pass


class ModelError(SqueezeError):
    pass
