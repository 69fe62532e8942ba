"""The paper's comparison (its Table 1 and Fig. 6) as a reusable experiment driver.

Given a base model, datasets and a :class:`Grid` (methods, criteria, filter densities, seeds),
:func:`plan` builds one :class:`~sparta.config.RunConfig` per *trajectory*: one run per
``(method, criterion, seed)`` that prunes iteratively down to the grid's **lowest** filter
density, removing ``step_fraction`` of the original filter count per step (the paper's 5%), with
recovery training after every step. The higher densities are read from the evaluation records
the runner writes after every step (``result["steps"]``; each record's ``level`` is the
schedule's filter density and ``density`` the achieved one), so a 30% row and a 10% row of one
method and seed come from the same run, as in the paper's iterative protocol. Full fine-tuning
(``finetune``) is one dense run per seed with as many training epochs as a trajectory has in all.

"Density" is always the fraction of **filters** (output channels) kept; the fraction of weights
kept is reported beside it as ``weight_density``.

:func:`run_jobs` runs the trajectories through :func:`sparta.train.run` with ``resume=True`` (a
killed run continues from its checkpoint; a finished one is read back from its ``result.json``)
in ``workers`` processes (spawned, one intra-op thread each). A failing run is reported in its
outcome (``status == "failed"`` with the error), never dropped silently. :func:`rows`,
:func:`aggregate` (mean +- std over seeds) and :func:`claims` turn the outcomes into the table
and the paper's claims checked on them, in both parameter accountings (``stored``: what a task
file holds; ``paper``: Table 1's count, all norm affine parameters and the whole head);
:mod:`sparta.app.paper_report` prints and plots them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError, UnknownNameError
from .paper_claims import claim_lines, claims
from .paper_run import Job, run_jobs

__all__ = [
    "METHODS",
    "Comparison",
    "Grid",
    "Job",
    "aggregate",
    "claim_lines",
    "claims",
    "compare",
    "method_spec",
    "paper_config",
    "plan",
    "rows",
    "run_jobs",
]

#: Methods of the paper's Table 1 by key: runner settings and the label shown.
METHODS: dict[str, dict] = {
    "finetune": {"method": "finetune", "label": "full fine-tuning"},
    "fine-pruning": {"method": "fine-pruning", "label": "fine-pruning"},
    "splora-r8": {"method": "splora", "rank": 8, "label": "SPLoRA r8"},
    "splora-r32": {"method": "splora", "rank": 32, "label": "SPLoRA r32"},
    "sppara": {"method": "sppara", "label": "SPPaRA"},
}
DEFAULT_METHODS = tuple(METHODS)
#: The paper's step: 5% of the original filter count removed per pruning step.
STEP_FRACTION = 0.05
ACCOUNTINGS = {"stored": "learned_parameters", "paper": "learned_parameters_paper"}


def method_spec(key: str) -> dict:
    """Runner settings of a method key: one of :data:`METHODS`, or ``splora-r<N>``."""
    if key in METHODS:
        return dict(METHODS[key])
    if key.startswith("splora-r") and key[8:].isdigit() and int(key[8:]) > 0:
        return {"method": "splora", "rank": int(key[8:]), "label": f"SPLoRA r{int(key[8:])}"}
    raise UnknownNameError("method", key, [*METHODS, "splora-r<rank>"])


@dataclass(frozen=True)
class Grid:
    """What to compare. ``densities`` are filter densities in (0, 1); every one must lie on
    the linear schedule of ``step_fraction`` steps down to the lowest one (e.g. 0.3 and 0.1
    with steps of 0.05 or 0.1)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    criteria: tuple[str, ...] = ("taylor",)
    densities: tuple[float, ...] = (0.3, 0.1)
    seeds: tuple[int, ...] = (0,)
    step_fraction: float = STEP_FRACTION

    def __post_init__(self):
        for name in ("methods", "criteria", "densities", "seeds"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise ConfigError(f"Grid.{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
            if not getattr(self, name):
                raise ConfigError(f"Grid.{name} must not be empty")
        for key in self.methods:
            method_spec(key)
        if any(isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d < 1
               for d in self.densities):  # fmt: skip
            raise ConfigError(f"densities must be filter densities in (0, 1), got {self.densities}")
        object.__setattr__(self, "densities", tuple(sorted(set(self.densities), reverse=True)))
        if not 0 < self.step_fraction < 1:
            raise ConfigError(f"step_fraction must be in (0, 1), got {self.step_fraction!r}")
        _ = self.steps  # checks that every density is on the schedule

    @property
    def steps(self) -> int:
        """Pruning steps of a trajectory: ``(1 - lowest density) / step_fraction``."""
        low = min(self.densities)
        steps = round((1 - low) / self.step_fraction)
        for d in self.densities:
            k = (1 - d) / (1 - low) * steps
            if steps < 1 or abs(k - round(k)) > 1e-6:
                raise ConfigError(
                    f"filter density {d:g} is not reached by steps of {self.step_fraction:g} of "
                    f"the filters down to {low:g}; choose densities on that grid or another "
                    "step_fraction"
                )
        return steps


def paper_config(**overrides) -> RunConfig:
    """``RunConfig.from_recipe("paper", **overrides)``: the paper's protocol (SGD with momentum
    and weight decay, step schedule, adapter learning-rate multiplier, global ranking, a
    validation split), with ``overrides`` winning."""
    return RunConfig.from_recipe("paper", **overrides)


def plan(
    grid: Grid, out_dir: str | Path, method_overrides: dict | None = None, **overrides
) -> list[Job]:
    """One :class:`Job` per ``(method, criterion, seed)`` (``finetune``: per seed), each
    writing into ``<out_dir>/<method>/<criterion>/s<seed>``. ``overrides`` go to every run's
    config (e.g. ``epochs``, ``lr``, ``batch_size``, ``device="cpu"``); ``method_overrides``
    maps a method key to settings of its own (e.g. ``{"finetune": {"epochs": 20}}``)."""
    method_overrides = method_overrides or {}
    unknown = set(method_overrides) - set(grid.methods)
    if unknown:
        raise ConfigError(f"method_overrides names methods not in the grid: {sorted(unknown)}")
    jobs = []
    for key in grid.methods:
        spec = method_spec(key)
        label, rank = spec.pop("label"), spec.get("rank")
        dense = spec["method"] == "finetune"
        for criterion in (None,) if dense else grid.criteria:
            for seed in grid.seeds:
                name = f"{key}/{criterion or 'dense'}/s{seed}"
                own = method_overrides.get(key, {})
                settings = {
                    **overrides,
                    **spec,
                    "seed": seed,
                    "output_dir": str(Path(out_dir) / name),
                }
                if dense:
                    settings["steps"] = 0
                else:
                    settings.update(
                        criterion=criterion, target=min(grid.densities), steps=grid.steps
                    )
                config = paper_config(**settings, **own)
                if dense and "epochs" not in own:  # the same training budget as a trajectory
                    config = config.replace(
                        epochs=config.epochs + grid.steps * config.recovery_epochs
                    )
                jobs.append(Job(name, key, criterion, seed, config, label, rank))
    return jobs


# -- rows, aggregation -------------------------------------------------------------------------
def rows(
    jobs: Sequence[Job], outcomes: Sequence[dict], grid: Grid, dense_start: bool = False
) -> list[dict]:
    """One row per ``(method, criterion, density, seed)`` of every finished run: the
    evaluation record at that filter density (``finetune``: its final one, density 1). With
    ``dense_start``, each trajectory also gives a density-1 row: its evaluation before the first
    pruning step (after the initial training epochs only)."""
    out = []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if outcome["status"] == "failed":
            continue
        records = outcome["result"]["steps"]
        targets = [1.0] if job.criterion is None else list(grid.densities)
        if dense_start and job.criterion is not None:
            targets.insert(0, 1.0)
        for target in targets:
            record = records[-1] if job.criterion is None else _record_at(records, target)
            out.append(_row(job, target, record))
    return out


def _record_at(records: list[dict], target: float) -> dict:
    """The evaluation whose schedule level is ``target`` (else the nearest achieved one)."""
    if target == 1.0:
        return records[0]
    exact = [r for r in records if r["step"] > 0 and abs(r.get("level", -1) - target) < 1e-6]
    if exact:
        return exact[-1]
    return min(records, key=lambda r: abs(r["density"] - target))


def _row(job: Job, target: float, record: dict) -> dict:
    row = {
        "method": job.method,
        "label": job.label,
        "criterion": job.criterion,
        "seed": job.seed,
        "rank": job.rank,
        "target_density": target,
        "filter_density": record["density"],
        "weight_density": 1.0 - record["sparsity"],
        "accuracy": record["accuracy"],
        "val_accuracy": record.get("val_accuracy"),
        "learned_parameters": record["learned_parameters"],
        "learned_parameters_paper": record.get("learned_parameters_paper"),
        "macs": record["macs"],
        "mflops": 2 * record["macs"] / 1e6,
        "step": record["step"],
        "epochs_trained": record.get("epochs_trained"),
    }
    adapters = record.get("adapter_parameters")  # absent from results of older versions
    if job.rank is not None and adapters is not None:  # the split the ceiling is built on
        row["adapter_parameters"], row["adapter_per_rank"] = adapters, adapters / job.rank
        row["rest_stored"] = record["learned_parameters"] - adapters
        paper = record.get("learned_parameters_paper")
        row["rest_paper"] = None if paper is None else paper - adapters
    return row


#: Row fields averaged over seeds.
METRICS = (
    "accuracy",
    "val_accuracy",
    "learned_parameters",
    "learned_parameters_paper",
    "macs",
    "mflops",
    "filter_density",
    "weight_density",
    "adapter_parameters",
    "adapter_per_rank",
    "rest_stored",
    "rest_paper",
)


def aggregate(table: Sequence[dict]) -> list[dict]:
    """Rows grouped by ``(method, criterion, target_density)`` in first-seen order, each
    metric as ``<name>`` (mean over seeds) and ``<name>_std`` (sample std; 0 for one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in table:
        groups.setdefault((r["method"], r["criterion"], r["target_density"]), []).append(r)
    out = []
    for (method, criterion, density), members in groups.items():
        first = members[0]
        agg = {
            "method": method,
            "label": first["label"],
            "criterion": criterion,
            "rank": first["rank"],
            "target_density": density,
            "seeds": [m["seed"] for m in members],
            "n": len(members),
        }
        for key in METRICS:
            values = [m.get(key) for m in members]
            if any(v is None for v in values):
                agg[key] = agg[f"{key}_std"] = None
                continue
            agg[key], agg[f"{key}_std"] = _mean_std(values)
        out.append(agg)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Comparison:
    """Everything :func:`compare` produced."""

    grid: Grid
    jobs: list[Job]
    outcomes: list[dict]
    rows: list[dict]
    aggregated: list[dict]
    claims: dict
    failed: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "format": "sparta.paper",
            "version": 1,
            "grid": {**self.grid.__dict__, "steps": self.grid.steps},
            "density_meaning": "fraction of filters (output channels) kept",
            "runs": [
                {k: o.get(k) for k in ("key", "status", "resumed", "wall_s", "output_dir", "error")}
                for o in self.outcomes
            ],
            "configs": {j.key: j.config.to_dict() for j in self.jobs},
            "rows": self.rows,
            "aggregated": self.aggregated,
            "claims": self.claims,
        }


def compare(
    grid: Grid,
    base,
    data,
    out_dir: str | Path,
    workers: int = 2,
    resume: bool = True,
    method_overrides: dict | None = None,
    on_outcome: Callable[[dict], None] | None = None,
    dense_start: bool = False,
    **overrides,
) -> Comparison:
    """Plan (``overrides``: run settings, see :func:`plan`), run ``base`` on ``data`` (objects
    or factories, see :func:`run_jobs`), tabulate and check the claims, in one call."""
    jobs = plan(grid, out_dir, method_overrides, **overrides)
    outcomes = run_jobs(jobs, base, data, workers, resume, on_outcome=on_outcome)
    table = rows(jobs, outcomes, grid, dense_start)
    agg = aggregate(table)
    failed = [o for o in outcomes if o["status"] == "failed"]
    return Comparison(grid, jobs, outcomes, table, agg, claims(agg), failed)
