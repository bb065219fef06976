"""Evaluation protocols: pair-set verification (verification.py) and IJB-B/C 1:1 (ijb.py), with the networks
(inference.py), images and alignment, ROC and reports they use."""
from arcface.evaluation.pairs import PairSet, load_pair_set
from arcface.evaluation.verification import VerificationResult, evaluate

__all__ = ["PairSet", "load_pair_set", "VerificationResult", "evaluate"]
