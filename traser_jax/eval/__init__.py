"""Evaluation: scene-graph metrics (numpy only), judges, benchmark VideoQA with scene graphs.

    from traser_jax.eval import evaluate, most_frequent_relation_baseline
    from traser_jax.eval.judges import ExactJudge, OfflineJudge, LLMJudge
"""
from traser_jax.eval.metrics import evaluate, most_frequent_relation_baseline

__all__ = ["evaluate", "most_frequent_relation_baseline"]
