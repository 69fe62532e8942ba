"""Where a model's time goes in ONNX Runtime: per-operator profiles at 1 and 2 threads.

Used by ``benchmarks/deploy.py`` (section 2b) to explain the batch-1 speed-up of a compact model
over its base: each model is exported and served exactly as ``sparta.deploy`` serves it
(:func:`sparta.onnx_session.onnx_session`: every graph optimisation, threads spinning within a
call), with ONNX Runtime's profiler on; all sessions are called in turn, one call each. From the profile, per model and thread count:

* ``nodes``: operators per call after ONNX Runtime's graph optimisation;
* ``run``: the whole call (its ``model_run`` event), median and min over the repeats;
* ``conv``: the convolutions' time (sum of per-operator medians), their MACs as the model
  counts them and as the blocked kernels compute them (channels padded: the profile's shapes),
  and the rate in real GMAC/s;
* ``executor_us``: the call's time outside its operators, per operator (the executor's floor);
* ``sync_us`` (2 threads): per convolution, the median of ``t(2 threads) - t(1 thread) / 2``,
  i.e. what running an operator on two threads costs beyond halving it (waking or waiting for
  the second thread, splitting the work unevenly).

Figures are medians of per-operator times over the repeats; on a loaded machine they are
noisy, and the per-operator minimums (also kept) estimate a quiet machine.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from sparta.onnx_session import load_onnxruntime, onnx_session

WARMUP = 3  # calls before the profiled ones (the session's own check is one more)


def profile(model: nn.Module, x: torch.Tensor, threads: int, repeats: int, folder: str) -> dict:
    """Per-operator profile of ``model`` on ``x`` as ``sparta.deploy`` serves it."""
    return profiles({"model": model}, x, (threads,), repeats, folder)["model"][str(threads)]


def profiles(models: dict, x: torch.Tensor, threads: tuple, repeats: int, folder: str) -> dict:
    """``{name: {str(threads): profile}}`` for every model and thread count, the sessions
    called in turn, one call each (so that load on a shared machine hits them alike)."""
    ort = load_onnxruntime()
    sessions = {}
    for name, model in models.items():
        for t in threads:
            prefix = str(Path(folder) / f"profile_{len(sessions)}")
            sessions[name, t] = onnx_session(
                model, (x,), t, ort, lambda _: None, spin=True, profile=prefix
            )
    for _ in range(WARMUP + repeats):
        for _session, run in sessions.values():
            run([x])
    out: dict = {name: {} for name in models}
    for (name, t), (session, _run) in sessions.items():
        path = Path(session.end_profiling())
        events = json.loads(path.read_text(encoding="utf-8"))
        path.unlink()
        out[name][str(t)] = _summary(events, repeats)
    return out


def _summary(events: list[dict], repeats: int) -> dict:
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    runs = runs[-repeats:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run: list[list[dict]] = [[] for _ in runs]
    for e in nodes:  # each operator event belongs to the call whose span holds it
        for i, r in enumerate(runs):
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                per_run[i].append(e)
                break
    names = [e["name"] for e in per_run[0]]
    times = {n: [] for n in names}
    for events_of_run in per_run:
        for e in events_of_run:
            times.setdefault(e["name"], []).append(e["dur"])
    first = {e["name"]: e for e in per_run[0]}
    conv = [n for n in names if first[n]["args"]["op_name"] == "Conv"]
    run_us = [r["dur"] for r in runs]
    node_median = sum(statistics.median(times[n]) for n in names)
    return {
        "nodes": len(names),
        "run_median_ms": statistics.median(run_us) / 1e3,
        "run_min_ms": min(run_us) / 1e3,
        "operators_median_ms": node_median / 1e3,
        "operators_min_ms": sum(min(times[n]) for n in names) / 1e3,
        "executor_us": (statistics.median(run_us) - node_median) / max(len(names), 1),
        "convs": len(conv),
        "conv_ms": sum(statistics.median(times[n]) for n in conv) / 1e3,
        "conv_padded_macs": sum(_padded_macs(first[n]["args"]) for n in conv),
        "conv_us": {n: statistics.median(times[n]) for n in conv},
        "repeats": len(runs),
    }


def _padded_macs(args: dict) -> int:
    """MACs of a convolution as run: output size x weight size per output channel (the
    profile's shapes are the blocked kernel's, channels padded)."""
    shapes = [next(iter(s.values())) for s in args["input_type_shape"]]
    output = next(iter(args["output_type_shape"][0].values()))
    return math.prod(output) * math.prod(shapes[1][1:])


def profile_section(models: dict[str, nn.Module], macs: dict[str, int], repeats: int) -> dict:
    """Profiles of every model at batch 1 on 1 and 2 threads, printed, with what they say about
    the compact models' speed-up over ``models["base"]``."""
    x = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as folder:
        out = profiles(models, x, (1, 2), repeats, folder)
    for name, p in out.items():
        one, two = p["1"], p["2"]
        sync = [two["conv_us"][n] - one["conv_us"][n] / 2 for n in one["conv_us"]]
        p["sync_us"] = statistics.median(sync) if sync else 0.0
        p["macs"] = macs[name]
        p["padding"] = max(0.0, one["conv_padded_macs"] / macs[name] - 1)  # the fc's MACs aside
        for q in (one, two):
            q["gmacs_per_s"] = macs[name] / q["conv_ms"] / 1e6
            del q["conv_us"]  # per-operator detail: not kept in the JSON
        print(
            f"   {name:<22} {one['nodes']:3d} ops, {macs[name] / 1e9:.3f} GMAC (+{p['padding']:4.0%}"
            f" padded): 1 thread {one['run_median_ms']:6.2f} ms (convs {one['gmacs_per_s']:5.1f} "
            f"GMAC/s), 2 threads {two['run_median_ms']:6.2f} ms ({two['gmacs_per_s']:5.1f} GMAC/s"
            f", x{one['run_median_ms'] / two['run_median_ms']:.2f}); executor "
            f"{two['executor_us']:.1f} us/op, two-thread cost {p['sync_us']:.1f} us/conv"
        )
    _explain(out)
    return out


def _explain(out: dict) -> None:
    """The batch-1 speed-up of each compact model, split into what the MACs allow, what
    padding takes and what the per-operator costs take (2 threads)."""
    base = out["base"]
    for name, p in out.items():
        if name == "base":
            continue
        limit = base["macs"] / p["macs"]
        padded = base["1"]["conv_padded_macs"] / p["1"]["conv_padded_macs"]
        for t in ("1", "2"):
            got = base[t]["run_median_ms"] / p[t]["run_median_ms"]
            print(
                f"   {name}, {t} thread{'s' if t == '2' else ''}: speed-up {got:.2f}x = "
                f"{got / limit:.2f} of the MAC ratio {limit:.2f}x (padded MACs allow {padded:.2f}x)"
            )
        two, ops, convs = p["2"], p["2"]["nodes"], p["2"]["convs"]
        fixed = (ops * two["executor_us"] + convs * p["sync_us"]) / 1e3
        print(
            f"   {name}: per-operator floor on 2 threads: {ops} ops x {two['executor_us']:.1f} us "
            f"executor + {convs} convs x {p['sync_us']:.1f} us two-thread cost = "
            f"{fixed:.2f} ms of its {two['run_median_ms']:.2f} ms (the base pays the same count: "
            f"{base['2']['nodes']} ops)"
        )
