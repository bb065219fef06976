"""Classification heads: margins over cosine logits and the Partial FC classifier."""
# Registers the step pre-hook that stops a hand-built torch optimizer from failing on Partial FC's sparse gradient.
import arcface.engine.optim  # noqa: F401
from arcface.heads.fc_state import load_fc_state, save_fc_shards, save_fc_state
from arcface.heads.margins import AdaFace, CombinedMargin, CurricularFace, Margin
from arcface.heads.partial_fc import PartialFC

__all__ = ["AdaFace", "CombinedMargin", "CurricularFace", "Margin", "PartialFC", "load_fc_state", "save_fc_shards",
           "save_fc_state"]
