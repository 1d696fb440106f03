"""Prefect flows and the entry points (CLI, config schema) of squeezeflow."""
