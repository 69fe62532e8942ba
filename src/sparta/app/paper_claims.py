"""The paper's claims checked on aggregated rows (:func:`sparta.app.paper.aggregate`), in both
parameter accountings, and the structural ceiling of the parameter ratio on the network at hand.

The paper (Table 1, ResNet-50): at 10% filter density SPLoRA is at least as accurate as
fine-pruning with >= 2x fewer learned parameters; at 30% it is within 2 points with >= 15x
fewer. A SPLoRA model learns its adapters, ``rank * sum of kept (in + out)``, *plus* what
fine-pruning learns besides weights (head, norms, biases). As the rank goes to 0 the ratio
``fine-pruning learned / SPLoRA learned`` tends to ``fine-pruning learned / SPLoRA's
non-adapter learned``: the ceiling no rank can beat on that network and masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: ``(density, points SPLoRA may trail by, ratio required)``; the lowest-density check is
#: made at the grid's lowest density.
LOW_CLAIM = {"max_gap": 0.0, "ratio": 2.0}
MID_CLAIM = {"density": 0.3, "max_gap": 0.02, "ratio": 15.0}
RANKS = (1, 2, 4, 8, 16, 32)
ACCOUNTINGS = {"stored": "learned_parameters", "paper": "learned_parameters_paper"}


def _find(agg: Sequence[dict], method: str, criterion, density: float) -> dict | None:
    return next(
        (a for a in agg if a["method"] == method and a["criterion"] == criterion
         and abs(a["target_density"] - density) < 1e-9),
        None,
    )  # fmt: skip


def splora_key(agg: Sequence[dict]) -> str | None:
    """The SPLoRA method compared: rank 8 if present, else the lowest rank in the table."""
    ranked = sorted({(a["rank"], a["method"]) for a in agg if a["method"].startswith("splora")})
    if not ranked:
        return None
    return next((m for r, m in ranked if r == 8), ranked[0][1])


def claims(agg: Sequence[dict], splora: str | None = None, baseline="fine-pruning") -> dict:
    """``{"splora": key, "checks": [...], "ceiling": [...]}``: one check per criterion, claim
    (``lowest``, ``mid``) and accounting, each with the numbers and ``holds`` (``None`` where a
    number is missing); one ceiling entry per criterion, density and accounting."""
    splora = splora or splora_key(agg)
    out: dict = {"splora": splora, "baseline": baseline, "checks": [], "ceiling": []}
    if splora is None:
        return out
    densities = sorted({a["target_density"] for a in agg if a["criterion"] is not None})
    densities = [d for d in densities if d < 1] or densities  # dense rows are references
    criteria = list(dict.fromkeys(a["criterion"] for a in agg if a["criterion"] is not None))
    if not densities:
        return out
    wanted = [("lowest", densities[0], LOW_CLAIM["max_gap"], LOW_CLAIM["ratio"])]
    if any(abs(d - MID_CLAIM["density"]) < 1e-9 for d in densities) and densities[0] != 0.3:
        wanted.append(("mid", MID_CLAIM["density"], MID_CLAIM["max_gap"], MID_CLAIM["ratio"]))
    for criterion in criteria:
        for name, density, gap, ratio in wanted:
            sl = _find(agg, splora, criterion, density)
            fp = _find(agg, baseline, criterion, density)
            if sl and fp:
                for accounting in ACCOUNTINGS:
                    out["checks"].append(
                        _check(name, criterion, density, accounting, sl, fp, gap, ratio)
                    )
        for density in (d for d in densities if d < 1):
            sl = _find(agg, splora, criterion, density)
            fp = _find(agg, baseline, criterion, density)
            if sl and fp:
                for accounting in ACCOUNTINGS:
                    out["ceiling"].append(_ceiling(criterion, density, accounting, sl, fp))
    return out


def _check(name, criterion, density, accounting, sl, fp, gap, required) -> dict:
    key = ACCOUNTINGS[accounting]
    ratio = _ratio(fp.get(key), sl.get(key))
    accurate = sl["accuracy"] >= fp["accuracy"] - gap - 1e-12
    return {
        "claim": name,
        "criterion": criterion,
        "density": density,
        "accounting": accounting,
        "splora_accuracy": sl["accuracy"],
        "splora_accuracy_std": sl.get("accuracy_std"),
        "fine_pruning_accuracy": fp["accuracy"],
        "fine_pruning_accuracy_std": fp.get("accuracy_std"),
        "accuracy_gap_points": 100 * (sl["accuracy"] - fp["accuracy"]),
        "max_gap_points": 100 * gap,
        "splora_learned": sl.get(key),
        "fine_pruning_learned": fp.get(key),
        "ratio": ratio,
        "required_ratio": required,
        "accurate_enough": accurate,
        "ratio_enough": None if ratio is None else ratio >= required,
        "holds": None if ratio is None else accurate and ratio >= required,
        "seeds": sl["n"],
    }


def _ceiling(criterion, density, accounting, sl, fp) -> dict:
    fp_learned = fp.get(ACCOUNTINGS[accounting])
    rest, per_rank = sl.get(f"rest_{accounting}"), sl.get("adapter_per_rank")
    entry = {
        "criterion": criterion,
        "density": density,
        "accounting": accounting,
        "fine_pruning_learned": fp_learned,
        "splora_non_adapter_learned": rest,
        "splora_adapter_per_rank": per_rank,
        "ceiling": _ratio(fp_learned, rest),
        "ratio_at_rank": {},
        "max_rank_for_15x": None,
    }
    if fp_learned is not None and rest is not None and per_rank:
        entry["ratio_at_rank"] = {str(r): fp_learned / (rest + r * per_rank) for r in RANKS}
        budget = fp_learned / MID_CLAIM["ratio"] - rest
        entry["max_rank_for_15x"] = max(0, math.floor(budget / per_rank))
    return entry


def _ratio(a, b) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def claim_lines(result: dict) -> list[str]:
    """The checks and the ceiling as plain sentences, numbers included."""
    lines = []
    for c in result["checks"]:
        verdict = {True: "holds", False: "does not hold", None: "cannot be checked"}[c["holds"]]
        want = (
            "at least as accurate"
            if c["max_gap_points"] == 0
            else f"within {c['max_gap_points']:.0f} points"
        )
        ratio = "n/a" if c["ratio"] is None else f"{c['ratio']:.1f}x"
        lines.append(
            f"[{c['criterion']}, {c['density']:.0%} filter density, {c['accounting']} count] "
            f"SPLoRA {_pct(c, 'splora_accuracy')} with {_num(c['splora_learned'])} learned vs "
            f"fine-pruning {_pct(c, 'fine_pruning_accuracy')} with "
            f"{_num(c['fine_pruning_learned'])} ({ratio} fewer): '{want} with >= "
            f"{c['required_ratio']:.0f}x fewer' {verdict}."
        )
    for e in result["ceiling"]:
        if e["ceiling"] is None:
            continue
        ranks = ", ".join(f"r{r} {v:.1f}x" for r, v in e["ratio_at_rank"].items())
        need = e["max_rank_for_15x"]
        reach = "no rank reaches 15x" if need == 0 else f"15x needs rank <= {need}"
        lines.append(
            f"[{e['criterion']}, {e['density']:.0%} filter density, {e['accounting']} count] "
            f"structural ceiling of the ratio (rank -> 0): {e['ceiling']:.1f}x = fine-pruning "
            f"{_num(e['fine_pruning_learned'])} / SPLoRA's non-adapter "
            f"{_num(e['splora_non_adapter_learned'])}; with these masks {ranks}; {reach}."
        )
    return lines


def _pct(c: dict, key: str) -> str:
    std = c.get(f"{key}_std")
    spread = f" +- {100 * std:.1f}" if std and c.get("seeds", 1) > 1 else ""
    return f"{100 * c[key]:.1f}%{spread}"


def _num(n) -> str:
    return "n/a" if n is None else f"{round(n):,}"
