"""Evaluation: zero-shot classification and retrieval."""
from .retrieval import retrieval_metrics
from .zeroshot import build_classifier, load_classnames, load_templates, topk_correct

__all__ = ["retrieval_metrics", "build_classifier", "load_classnames", "load_templates", "topk_correct"]
