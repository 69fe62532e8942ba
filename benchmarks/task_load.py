"""Cost of reading a task file: ``sparta.Task.load`` of a ResNet-50 SPLoRA task pruned to
~10x fewer MACs, split into its stages, measured in one run (issue #13, the switch budget).

The stages are those of :func:`sparta.tasks.taskfile.read_task`, timed one by one on the same
file, interleaved over the repeats:

- read: open, check the size, read the header, then the body straight into one buffer;
- header + manifest: parse the safetensors header, inflate the manifest (file format 4 stores
  it deflated) and parse it (JSON), its SHA-256, the schema and the header's layout against it;
- tensors: views of the body, per-tensor SHA-256, finite values, unpacked masks, mask fit;
- ``Task.load``: all of it, as a caller sees it;
- ``Builder.check``: the base-fingerprint check a build runs per task switch (base digests
  cached after the first), with its manifest re-check.

For scale, the floors a reader in Python cannot go below: ``json.loads`` of the header and of
the manifest (every check needs them parsed), and SHA-256 of the body in one call.

    .venv/bin/python benchmarks/task_load.py [--repeats 50] [--threads 2]

Target: ``Task.load`` <= ~2-3 ms median on 2 cores (quiet machine). Numbers are measured,
never assumed; a busy machine makes them noisy (the load average is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

import sparta
from sparta.tasks import Builder
from sparta.tasks.manifest import ZMANIFEST_KEY
from sparta.tasks.taskbody import decode_body
from sparta.tasks.taskfile import (
    _checked_size,
    _read,
    _read_into,
    header_length,
    inspect,
    manifest_text,
)


def make_task(path: Path) -> tuple[torch.nn.Module, int]:
    """A ResNet-50 (10 classes) SPLoRA r=8 task pruned to ~10% of the MACs, saved to ``path``."""
    torch.manual_seed(0)
    base = torchvision.models.resnet50(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparta.wrap(base, "splora", rank=8)
        pruner = sparta.Pruner(model, x, criterion="l1", target="macs=0.1", steps=2, round_to=8)
        while not pruner.done:
            pruner.step()
        task = sparta.export(model.eval())
    return base, task.save(path)


def stages(path: str) -> dict[str, float]:
    """Seconds of each stage of one read of ``path``."""
    times = {}
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = _checked_size(fd, path, 2**30)
        prefix = _read(fd, min(9, size), path)
        n = header_length(prefix, size, path)
        prefix += _read(fd, 8 + n - len(prefix), path)
        body = torch.empty(size - len(prefix), dtype=torch.uint8)
        _read_into(fd, body.numpy(), path)
    finally:
        os.close(fd)
    times["read"] = time.perf_counter() - start
    start = time.perf_counter()
    manifest, layout = inspect(prefix, size, path)
    times["header + manifest"] = time.perf_counter() - start
    start = time.perf_counter()
    decode_body(body, layout, manifest, path)
    times["tensors"] = time.perf_counter() - start
    start = time.perf_counter()
    sparta.Task.load(path)
    times["Task.load"] = time.perf_counter() - start
    header = json.loads(prefix[8:].decode())
    text = manifest_text(header["__metadata__"])  # format 4: inflated (timed in the stage)
    start = time.perf_counter()
    json.loads(prefix[8:].decode())
    json.loads(text)
    times["floor: json.loads header + manifest"] = time.perf_counter() - start
    start = time.perf_counter()
    hashlib.sha256(body.numpy()).hexdigest()
    times["floor: SHA-256 of the body, one call"] = time.perf_counter() - start
    return times


def _metadata(path: str) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))["__metadata__"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "resnet50.safetensors")
        base, size = make_task(Path(path))
        task = sparta.Task.load(path)
        file_format = 4 if ZMANIFEST_KEY in _metadata(path) else task.manifest["version"]
        builder = Builder(base)
        builder.check(task)  # the base's digests, once per builder
        runs: dict[str, list[float]] = {}
        for _ in range(3):
            stages(path)  # warm the page cache and the code paths
        for _ in range(args.repeats):
            for name, seconds in stages(path).items():
                runs.setdefault(name, []).append(seconds)
            start = time.perf_counter()
            builder.check(task)
            runs.setdefault("Builder.check (per switch)", []).append(time.perf_counter() - start)
    print(
        f"task file: ResNet-50 SPLoRA r=8, ~10x fewer MACs, {size:,} bytes, "
        f"{len(task.tensors)} tensors, manifest version {task.manifest['version']}, file format "
        f"{file_format}"
    )
    print(
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + f", python {sys.version.split()[0]}, {args.repeats} repeats"
    )
    print(f"{'stage':42s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}")
    for name, values in runs.items():
        ms = [1000 * v for v in values]
        print(f"{name:42s} {statistics.median(ms):10.2f} {min(ms):8.2f} {max(ms):8.2f}")


if __name__ == "__main__":
    main()
