"""Moved: scoring a whole dataset is ``altub_fast.inference.score_dataset``; ``predict`` stays importable here until train/__init__ imports it from there."""
from ..inference.scorer import score_dataset as predict  # noqa: F401
