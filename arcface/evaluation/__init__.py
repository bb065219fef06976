"""Evaluation protocols: pair-set verification."""
from arcface.evaluation.pairs import PairSet, load_pair_set
from arcface.evaluation.verification import VerificationResult, evaluate

__all__ = ["PairSet", "load_pair_set", "VerificationResult", "evaluate"]
