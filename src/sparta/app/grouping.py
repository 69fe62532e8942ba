"""Which runs of a report are averaged together: runs whose every result-changing setting is
equal, one run per seed.

A run's *settings* are its config (:class:`~sparta.config.RunConfig` fields, defaults filled in
for fields an older result did not record) without the fields that do not change its result
(:data:`NOT_RESULTS`: the seed, where files go, which device, how many workers, ...). Runs
with equal settings form a group, averaged over seeds. Two groups that share the shown keys
(model, dataset, method, criterion, target) but differ in another setting (epochs, steps, lr,
...) stay apart and are told apart by a ``settings`` text naming what differs. The same
settings and seed found twice (a run folder copied, or two grids that overlap) count once,
with a note naming both folders.
"""

from __future__ import annotations

import dataclasses
import json

from ..config import RunConfig

#: Config fields that do not change a run's result: never split a group.
NOT_RESULTS = frozenset(
    {"seed", "output_dir", "device", "workers", "data_dir", "download", "recipe",
     "find_unused_parameters", "tensorboard", "tracking"}
)  # fmt: skip
#: Settings that a run which does not prune never uses: none for such a run, so that they never
#: split its group (its criterion and target show as none).
PRUNING_ONLY = frozenset(
    {"criterion", "target", "steps", "step_fraction", "schedule", "ranking", "round_to",
     "scoring_batches", "recovery_epochs", "pruner", "block_criterion", "granularity", "warmup",
     "cooldown", "penalty"}
)  # fmt: skip


def _defaults() -> dict:
    out = {}
    for f in dataclasses.fields(RunConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def settings_of(config: dict, prunes: bool) -> dict:
    """The result-changing settings of a recorded ``config`` (JSON data), defaults filled in."""
    merged = {**_defaults(), **(config if isinstance(config, dict) else {})}
    out = {k: v for k, v in merged.items() if k not in NOT_RESULTS}
    if not prunes:
        out.update(dict.fromkeys(PRUNING_ONLY & set(out)))
    return out


def _key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def group_runs(runs: list[dict], shown: tuple[str, ...]) -> tuple[list[list[dict]], list[str]]:
    """``(groups, notes)``: ``runs`` (each with ``settings``, ``seed``, ``output_dir``) in groups
    of equal settings, a repeated (settings, seed) kept once; each group's members get the
    ``settings`` text (see :func:`differing`), the notes say what was merged or dropped."""
    groups: dict[str, list[dict]] = {}
    notes: list[str] = []
    for run in runs:
        members = groups.setdefault(_key(run["settings"]), [])
        twin = next((m for m in members if m.get("seed") == run.get("seed")), None)
        if twin is not None:
            notes.append(
                f"seed {run.get('seed')} of {_label(run, shown)} is there twice "
                f"({twin['output_dir']} and {run['output_dir']}, same settings): counted once "
                f"(the first){_differs(twin, run)}"
            )
            continue
        members.append(run)
    found = list(groups.values())
    texts = differing([g[0]["settings"] for g in found], shown)
    for members, text in zip(found, texts):
        for m in members:
            m["settings_text"] = text
    for text, members in zip(texts, found):
        if text:
            notes.append(
                f"{_label(members[0], shown)} [{text}]: kept apart from runs of the same "
                f"{', '.join(shown)} whose other settings differ"
            )
    return found, notes


def differing(settings: list[dict], shown: tuple[str, ...]) -> list[str]:
    """Per settings dict, ``"k=v, ..."`` of the settings (outside ``shown``) in which it differs
    from another one with the same ``shown`` values; ``""`` where none does."""
    by_shown: dict[str, list[int]] = {}
    for i, s in enumerate(settings):
        by_shown.setdefault(_key({k: s.get(k) for k in shown}), []).append(i)
    texts = [""] * len(settings)
    for indices in by_shown.values():
        if len(indices) < 2:
            continue
        keys = sorted(
            {k for i in indices for k in settings[i] if k not in shown}
            - {
                k
                for k in settings[indices[0]]
                if len({_key({"v": settings[i].get(k)}) for i in indices}) == 1
            }
        )
        for i in indices:
            texts[i] = ", ".join(f"{k}={settings[i].get(k)}" for k in keys)
    return texts


def _label(run: dict, shown: tuple[str, ...]) -> str:
    return "/".join(str(run.get(k)) for k in shown if run.get(k) is not None)


def _differs(a: dict, b: dict) -> str:
    if a.get("accuracy") == b.get("accuracy"):
        return ""
    return f"; their accuracies differ ({a.get('accuracy')} vs {b.get('accuracy')})"
