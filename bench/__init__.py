"""Benchmark entry points: the recipes measured against the peers a user would pick instead."""
