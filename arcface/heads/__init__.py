"""Classification heads: margins over cosine logits and the Partial FC classifier."""
from arcface.heads.margins import CombinedMargin
from arcface.heads.partial_fc import PartialFC

__all__ = ["CombinedMargin", "PartialFC"]
