"""Retrieval evaluation: ``core.evaluate`` (pure, the search injected), the pair sampling, the
stage that reads a run's features and writes its results, its TensorBoard pictures, and the
sharded protocol of a database split over array tasks."""

from imret.evaluate.core import ExactSearch, Evaluation, Search, evaluate

__all__ = ["ExactSearch", "Evaluation", "Search", "evaluate"]
