"""Engines: vectorized (vmap over the cohort) and sequential (reference)."""

from fedkin.engine.engines import EngineConfig, SequentialEngine, VectorizedEngine

__all__ = ["EngineConfig", "SequentialEngine", "VectorizedEngine"]
