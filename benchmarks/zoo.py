"""Model-zoo benchmark: the full sparta loop on every torchvision classifier and a timm list.

The loop (:func:`full_loop`), per model and criterion (``l1`` and ``taylor``):
``sparta.wrap(model, "splora", rank=4)`` -> ``sparta.Pruner`` (half the filters, 2 steps) ->
``sparta.export`` -> ``Task.save`` -> ``Task.load`` -> ``sparta.build(base, task)``; then the
masked (wrapped) model's outputs vs the compact model's (max relative difference), the base
checked bit-identical to a copy taken before, and the params and MACs ratios compact/base.

Each model runs in its own subprocess under a time and an address-space limit, so one model
cannot take the sweep down; a row is ``pass`` (exact to 1e-4 relative), ``refused`` (a clear
sparta error, e.g. a model that cannot be handled) or ``fail`` (anything else: a raw error, a
wrong result, a timeout, memory). Random weights only; nothing is downloaded.

Run: ``.venv/bin/python benchmarks/zoo.py`` (all, about 1 hour on 2 cores),
``--models resnet18,deit_tiny_patch16_224``, ``--no-timm``, ``--json zoo.json``,
``--markdown zoo.md``; ``--readme zoo.json`` writes README.md's "Supported models" table.
Large models (over ``--large`` million parameters, default 200: vit_l/h, regnet_y_128gf) are
run last with the ``--large-memory`` limit; ``--skip-large`` leaves them out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparta

CRITERIA = ("l1", "taylor")
DEFAULT_SIZE = 64
#: Models whose layout needs a given input size (fixed positional embeddings or windows).
SIZES = {
    "inception_v3": 96,
    "vit_b_16": 224,
    "vit_b_32": 224,
    "vit_l_16": 224,
    "vit_l_32": 224,
    "vit_h_14": 224,
    "maxvit_t": 224,
    "deit_tiny_patch16_224": 224,
    "vit_tiny_patch16_224": 224,
    "coat_tiny": 224,
    "levit_128s": 224,
    "swin_tiny_patch4_window7_224": 224,
    "mobilevitv2_050": 64,
}
#: timm models a user would try: the named families plus ones with unusual blocks.
TIMM = (
    "resnet18",
    "resnet50d",
    "efficientnet_b0",
    "tf_efficientnet_b0",  # Conv2dSame: "same" padding computed in forward
    "convnext_atto",
    "regnetx_002",
    "regnety_002",
    "deit_tiny_patch16_224",
    "vit_tiny_patch16_224",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "swin_tiny_patch4_window7_224",
    "nf_resnet26",
    "resnetv2_50x1_bit",
    "ghostnet_100",
    "rexnet_100",
    "hrnet_w18_small",
    "levit_128s",
    "coat_tiny",
    "edgenext_xx_small",
    "mobilenetv3_small_050",
    "lcnet_050",
    "repvgg_a0",
    "dla34",
    "cspresnet50",
    "densenet121",
    "dpn48b",
    "res2net50_14w_8s",
    "skresnet18",
    "efficientformer_l1",
    "poolformer_s12",
    "mixer_s16_224",
    "convmixer_768_32",
    "tinynet_e",
    "fastvit_t8",
)


@dataclass
class Row:
    """One model's outcome."""

    model: str
    source: str
    size: int
    status: str = "fail"  # pass | refused | fail | skipped
    max_rel_diff: float | None = None
    init_rel_diff: float | None = None
    params_ratio: float | None = None
    macs_ratio: float | None = None
    density: float | None = None
    seconds: float = 0.0
    params: int | None = None
    peak_gb: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


# -- the loop ------------------------------------------------------------------------------------
def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return _logits(out[0])


def _run(model: nn.Module, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return _logits(out).float()


def rel_diff(want: torch.Tensor, got: torch.Tensor) -> float:
    if want.shape != got.shape:
        return float("inf")
    return float((got - want).abs().max() / (want.abs().max() + 1e-12))


def _loss(outputs, targets):
    return F.cross_entropy(outputs.float(), targets)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_unchanged(base: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Every tensor of ``base`` bit-identical (values, dtype, shape) to ``before``."""
    now = base.state_dict()
    if now.keys() != before.keys():
        return False
    return all(
        now[k].dtype == v.dtype and now[k].shape == v.shape and torch.equal(now[k], v)
        for k, v in before.items()
    )


def full_loop(
    base: nn.Module,
    inputs,
    criterion: str = "l1",
    *,
    target: float = 0.5,
    steps: int = 2,
    rank: int = 4,
    ranking: str = "local",
    classes: int | None = None,
    workdir: str | Path | None = None,
) -> dict:
    """wrap -> Pruner -> export -> save -> load -> build on ``base`` (eval mode, never changed).

    ``ranking="local"`` prunes every group to the same fraction, so that every group's removal
    is exercised and no output collapses to zeros (global ranking with l1 on random weights
    can empty a residual stream down to one channel, and a comparison of zeros shows nothing).

    Returns ``max_rel_diff`` (masked vs compact), ``output_scale`` (largest masked output over
    the base's), ``init_rel_diff`` (wrapped at init vs base),
    ``base_unchanged``, ``params_ratio``, ``macs_ratio`` (compact / base), ``density``
    (filters kept), ``notes`` (grouping notes, dense groups) and the ``compact`` model.
    """
    base.eval()
    before = _state(base)
    reference = _run(base, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped layers are listed in the report
        model = sparta.wrap(base, "splora", rank=rank)
    init_diff = rel_diff(reference, _run(model.eval(), inputs))
    pruner = sparta.Pruner(
        model, inputs, criterion=criterion, target=target, steps=steps, ranking=ranking
    )
    classes = classes or reference.shape[-1]
    targets = torch.arange(reference.shape[0]) % classes
    while not pruner.done:
        if pruner.criterion.data_driven:
            model.train()
            pruner.score([(inputs, targets)], _loss)
        pruner.step()
    model.eval()
    masked = _run(model, inputs)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "task.safetensors"
        sparta.export(model).save(path)
        task = sparta.Task.load(path)
    compact = sparta.build(base, task)
    got = _run(compact, inputs)
    macs_base = sparta.MacCounter(base, inputs).count(base)
    macs_compact = sparta.MacCounter(compact, inputs).count(compact)
    report = compact.sparta_compact
    notes = list(pruner.notes) + [f"kept dense {g.name}: {g.dense_reason}" for g in report.dense]
    return {
        "max_rel_diff": rel_diff(masked, got),
        "output_scale": float(masked.abs().max() / (reference.abs().max() + 1e-30)),
        "init_rel_diff": init_diff,
        "base_unchanged": base_unchanged(base, before),
        "params_ratio": _params(compact) / _params(base),
        "macs_ratio": macs_compact / max(macs_base, 1),
        "density": pruner.achieved()["density"],
        "format": task.manifest["version"],  # 3: built from the task's compact plan
        "notes": notes,
        "compact": compact,
    }


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the models ----------------------------------------------------------------------------------
def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def make_model(name: str, source: str) -> nn.Module:
    """A classifier with random weights and 10 classes (nothing is downloaded); layers
    initialised to zeros (the heads of torchvision's ViT and timm's MLP-Mixer) get random
    weights, else every output is exactly zero and comparing outputs shows nothing."""
    model = _make_model(name, source)
    with torch.no_grad():
        for m in model.modules():
            weight = getattr(m, "weight", None)
            if isinstance(m, nn.Linear | nn.Conv2d) and not bool(weight.any()):
                weight.normal_(0, 0.02)
    return model


def _make_model(name: str, source: str) -> nn.Module:
    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        kwargs = {"weights": None, "num_classes": 10}
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=False)
        return torchvision.models.get_model(name, **kwargs)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)
    raise ValueError(f"unknown model source {source!r}")


def input_size(name: str, source: str) -> int:
    if name in SIZES:
        return SIZES[name]
    if source == "timm":
        import timm

        cfg = timm.get_pretrained_cfg(name)
        fixed = cfg is not None and getattr(cfg, "fixed_input_size", False)
        if fixed:
            return int(cfg.input_size[-1])
    return DEFAULT_SIZE


def run_model(name: str, source: str, criteria=CRITERIA, batch: int = 2) -> Row:
    """The loop for every criterion on one model, in this process."""
    size = input_size(name, source)
    row = Row(name, source, size)
    start = time.perf_counter()
    try:
        base = make_model(name, source)
        row.params = _params(base)
        torch.manual_seed(1)
        x = torch.randn(batch, 3, size, size)
        diffs, init, params, macs, density, notes, same = [], [], [], [], [], [], True
        scale = float("inf")
        for criterion in criteria:
            out = full_loop(base, x, criterion)
            diffs.append(out["max_rel_diff"])
            init.append(out["init_rel_diff"])
            params.append(out["params_ratio"])
            macs.append(out["macs_ratio"])
            density.append(out["density"])
            notes += [n for n in out["notes"] if n not in notes]
            same = same and out["base_unchanged"]
            scale = min(scale, out["output_scale"])
            del out  # the compact model: free it before the next criterion
            gc.collect()
        row.max_rel_diff, row.init_rel_diff = max(diffs), max(init)
        row.params_ratio, row.macs_ratio, row.density = max(params), max(macs), max(density)
        row.notes = notes
        if not same:
            row.error = "the base changed"
        elif not row.init_rel_diff <= 1e-2:  # SPLoRA's init changes outputs by ~1e-4
            row.error = f"wrapped model differs from the base at init by {row.init_rel_diff:.3g}"
        elif not scale > 1e-9:  # the comparison below would compare (near) zeros
            row.error = f"the pruned model's outputs collapsed ({scale:.1e} of the base's)"
        elif not row.max_rel_diff <= 1e-4:
            row.error = f"compact differs from masked by {row.max_rel_diff:.3g} relative"
        else:
            row.status = "pass"
    except sparta.SpartaError as exc:  # a clear refusal
        row.status, row.error = "refused", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # anything else is a failure to fix
        row.error = f"{type(exc).__name__}: {exc}"
    row.seconds = round(time.perf_counter() - start, 1)
    return row


# -- the sweep -----------------------------------------------------------------------------------
def _rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return 0.0


def _address_limit(gb: float):
    def apply():  # a backstop only: torch reserves much more address space than it uses
        limit = int(gb * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_isolated(
    name: str, source: str, timeout: float, memory_gb: float, threads: int, criteria=CRITERIA
) -> Row:
    """:func:`run_model` in a subprocess, killed past ``timeout`` seconds or ``memory_gb`` of
    resident memory (polled; the address space is also capped, at 3x that)."""
    cmd = [sys.executable, __file__, "--one", f"{source}:{name}", "--threads", str(threads)]
    cmd += ["--criteria", ",".join(criteria)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start, peak, why = time.perf_counter(), 0.0, None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            text=True,
            env=env,
            preexec_fn=_address_limit(3 * memory_gb),
        )
        while proc.poll() is None:
            time.sleep(0.2)
            peak = max(peak, _rss_gb(proc.pid))
            if peak > memory_gb:
                why = f"memory: over {memory_gb:g} GB resident"
            elif time.perf_counter() - start > timeout:
                why = f"timeout: no result after {timeout:.0f} s"
            if why:
                proc.kill()
                proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    seconds = round(time.perf_counter() - start, 1)
    for line in reversed(stdout.splitlines()):
        if line.startswith("ZOO-ROW ") and why is None:
            row = Row(**json.loads(line[len("ZOO-ROW ") :]))
            row.peak_gb = round(peak, 2)
            return row
    row = Row(name, source, input_size(name, source), seconds=seconds, peak_gb=round(peak, 2))
    tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
    row.error = why or f"process died (exit {proc.returncode}): {tail[:300]}"
    return row


def _param_count(name: str, source: str) -> int:
    """Parameters, without building the model where possible (torchvision records them)."""
    if source == "torchvision":
        import torchvision

        weights = torchvision.models.get_model_weights(name)
        return int(next(iter(weights)).meta["num_params"])
    try:
        with torch.device("meta"):
            return _params(make_model(name, source))
    except Exception:  # some initialisations cannot run on meta tensors: count as small
        return 0


def machine() -> str:
    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads by default), "
        f"python {platform.python_version()}"
    )


def select(args) -> list[tuple[str, str]]:
    if args.models:
        chosen = []
        tv = set(torchvision_names())
        for spec in args.models.split(","):
            source, _, name = spec.rpartition(":")
            chosen.append((name, source or ("torchvision" if name in tv else "timm")))
        return chosen
    models = [(n, "torchvision") for n in torchvision_names()]
    if args.timm:
        models += [(n, "timm") for n in TIMM]
    return models


def sweep(args) -> list[Row]:
    """Every selected model in its own subprocess, ``args.jobs`` at a time; large models last
    (one at a time, with ``args.large_memory``)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    models = select(args)
    sizes = {m: _param_count(*m) for m in models}
    large = [m for m in models if sizes[m] > args.large * 1e6]
    small = [m for m in models if m not in large]
    rows: dict[tuple[str, str], Row] = {}
    print(f"# {machine()}; {len(models)} models, {args.jobs} at a time, 1 thread each", flush=True)

    def done(m, row):
        rows[m] = row
        print(f"[{len(rows)}/{len(models)}] {_line(row)}", flush=True)
        if args.json:  # written as it goes: a long sweep can be watched
            write_json([rows[k] for k in models if k in rows], args.json)

    crit = args.criteria.split(",")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            pool.submit(run_isolated, n, s, args.timeout, args.memory, args.threads, crit): (n, s)
            for n, s in small
        }
        for future in as_completed(futures):
            done(futures[future], future.result())
    for name, source in large:
        if args.skip_large:
            row = Row(name, source, input_size(name, source), status="skipped")
            row.error = f"--skip-large: {sizes[(name, source)] / 1e6:.0f} M parameters"
        else:
            row = run_isolated(name, source, args.timeout, args.large_memory, args.threads, crit)
        done((name, source), row)
    return [rows[m] for m in models]


def _line(row: Row) -> str:
    peak = f" {row.peak_gb:.1f}GB" if row.peak_gb else ""
    head = f"{row.source}:{row.model} {row.size}px {row.status} {row.seconds:.0f}s{peak}"
    if row.status == "pass":
        return (
            f"{head} diff {row.max_rel_diff:.1e} params {row.params_ratio:.2f} "
            f"MACs {row.macs_ratio:.2f}" + (f" ({len(row.notes)} notes)" if row.notes else "")
        )
    return f"{head}: {row.error}"


def write_json(rows: list[Row], path: str) -> None:
    data = {"machine": machine(), "rows": [asdict(r) for r in rows]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | source | px | result | max rel diff | params | MACs | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.status == "pass":
            cells = [
                "pass",
                f"{r.max_rel_diff:.1e}",
                f"{r.params_ratio:.2f}",
                f"{r.macs_ratio:.2f}",
            ]
        else:
            why = (r.error or "").replace("|", "/").replace("\n", " ")
            cells = [f"{r.status}: {why[:160]}", "", "", ""]
        lines.append(
            f"| {r.model} | {r.source} | {r.size} | " + " | ".join(cells) + f" | {r.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def summary(rows: list[Row]) -> str:
    parts = []
    for source in dict.fromkeys(r.source for r in rows):
        mine = [r for r in rows if r.source == source]
        passed = sum(r.status == "pass" for r in mine)
        parts.append(f"{source}: {passed} of {len(mine)} pass exactly (<= 1e-4 relative)")
    return "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names (source:name to force timm)")
    parser.add_argument("--timm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--markdown", help="write the table as Markdown here")
    parser.add_argument("--readme", metavar="JSON", help="write README.md's table from JSON")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument("--memory", type=float, default=6, help="GB resident memory per model")
    parser.add_argument("--large", type=float, default=200, help="M params that count as large")
    parser.add_argument("--large-memory", type=float, default=16, help="GB for large models")
    parser.add_argument("--skip-large", action="store_true", help="leave large models out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--jobs", type=int, default=1, help="models run at the same time")
    parser.add_argument("--criteria", default=",".join(CRITERIA), help="comma-separated")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        source, _, name = args.one.partition(":")
        row = run_model(name, source, args.criteria.split(","))
        print("ZOO-ROW " + json.dumps(asdict(row)), flush=True)
        return 0
    if args.readme:
        from readme_zoo import write_readme

        write_readme(args.readme)
        return 0
    rows = sweep(args)
    print(summary(rows))
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
