"""Evaluation results as JSON-ready dicts, MLflow metrics and the table printed on stdout."""
from __future__ import annotations

from arcface.evaluation.ijb import IJBResult
from arcface.evaluation.roc import FARS
from arcface.evaluation.verification import VerificationResult


def far_key(far: float) -> str:
    return f"{far:.0e}"  # 1e-04


def pair_set_summary(result: VerificationResult, pairs: int) -> dict:
    return {"pairs": pairs, "accuracy": result.accuracy, "accuracy_std": result.accuracy_std,
            "xnorm": result.xnorm, "val_at_far": result.val, "far": result.far_target}


def ijb_summary(result: IJBResult) -> dict:
    """TAR at each FAR (None where the impostor count cannot measure it), AUC and the counts behind them."""
    return {"images": result.images, "templates": result.templates, "pairs": len(result.scores),
            "genuine": result.roc.genuine, "impostors": result.roc.impostors,
            "detector_score": result.detector_score,
            "tar_at_far": {far_key(far): result.roc.tar_at_far(far) for far in FARS}, "auc": result.roc.auc}


def metrics(summaries: dict) -> dict[str, float]:
    """Flat `eval/<set>/<metric>` values of `{"pair_sets": {...}, "ijb": {...}}` (unmeasurable TARs left out)."""
    out = {}
    for name, s in summaries.get("pair_sets", {}).items():
        out.update({f"eval/{name}/acc": s["accuracy"], f"eval/{name}/acc_std": s["accuracy_std"],
                    f"eval/{name}/xnorm": s["xnorm"], f"eval/{name}/val_at_far": s["val_at_far"]})
    for target, s in summaries.get("ijb", {}).items():
        out.update({f"eval/{target}/tar_at_far_{far}": tar for far, tar in s["tar_at_far"].items() if tar is not None})
        out[f"eval/{target}/auc"] = s["auc"]
    return out


def table(summaries: dict) -> str:
    lines = []
    pair_sets = summaries.get("pair_sets", {})
    if pair_sets:
        far = next(iter(pair_sets.values()))["far"]
        lines.append(f"{'pair set':<16}{'pairs':>7}  {'accuracy':<19}{f'VAL@FAR={far:g}':>14}{'XNorm':>9}")
        for name, s in pair_sets.items():
            accuracy = f"{s['accuracy']:.5f} +- {s['accuracy_std']:.5f}"
            lines.append(f"{name:<16}{s['pairs']:>7}  {accuracy:<19}{s['val_at_far']:>14.4f}{s['xnorm']:>9.3f}")
    for target, s in summaries.get("ijb", {}).items():
        if lines:
            lines.append("")
        weighting = "with" if s["detector_score"] else "without"
        lines.append(f"{target} 1:1: {s['templates']} templates from {s['images']} images, {s['pairs']} pairs "
                     f"({s['genuine']} genuine), {weighting} detector-score weighting")
        lines.append("TAR@FAR " + "".join(f"{far:>9}" for far in s["tar_at_far"]) + f"{'AUC':>9}")
        lines.append(" " * 8 + "".join(f"{'n/a' if tar is None else f'{tar:.4f}':>9}"
                                       for tar in s["tar_at_far"].values()) + f"{s['auc']:>9.4f}")
    return "\n".join(lines)
