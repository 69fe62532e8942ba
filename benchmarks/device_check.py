"""Device check: the whole loop on an accelerator, under autocast and in low precision.

    python benchmarks/device_check.py [--device cuda] [--steps 3] [--size 64]

For torchvision resnet18 (SPLoRA) and a small BERT from a config (SPLoPA), in three modes
(fp32 base + autocast bf16; fp32 base + autocast fp16 with GradScaler; a base stored in bf16):
wrap on the device, compare the first step's gradients with fp32 (autocast modes), train a few
steps, prune (l1 or taylor), export -> save -> load -> build, and check that

* every parameter and buffer of the wrapped, masked and compact models is on the device, and
  the compact model keeps the base's dtype;
* the compact model equals the masked one within what ``sparta.build`` verifies (fp32: 1e-4
  relative; bf16/fp16: 4 eps of the dtype, as every layer rounds its output) and runs under
  autocast (TF32 is left at torch's defaults, as users get them);
* the base is bit-identical afterwards.

Prints one row per (model, mode) and exits 1 if any row fails. No GPU: it says so and runs on
the CPU (two to three minutes on two shared cores). Needs no download.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import sparta
from sparta.tasks import Task, build, export

MODES = {  # name: (base dtype, autocast dtype or None, GradScaler)
    "autocast bf16": (torch.float32, torch.bfloat16, False),
    "autocast fp16+scaler": (torch.float32, torch.float16, True),
    "bf16 base": (torch.bfloat16, None, False),
}
GRAD_TOL = {torch.bfloat16: 0.1, torch.float16: 0.02}  # relative norm, whole gradient vector
OUT_TOL = {d: max(1e-4, 4 * torch.finfo(d).eps) for d in (torch.float32, torch.bfloat16)}


@dataclass
class Case:
    model: str
    mode: str
    notes: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


def resnet(size: int):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, x, torch.arange(4) % 10, "splora", {"rank": 4}, "taylor"


def bert(_size: int):
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=3,
    )  # fmt: skip
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    model = transformers.BertForSequenceClassification(cfg)
    return model, {"input_ids": ids}, torch.arange(4) % 3, "splopa", {"block": 16}, "l1"


MODELS = {"resnet18": resnet, "bert": bert}


def run(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


def to(x, device, dtype):
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device, dtype)


def off_device(model, device) -> list[str]:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, t in tensors if t.device.type != device.type]


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def gradients(model, x, y, dtype) -> torch.Tensor:
    """All trainable gradients as one vector (eval mode: no batch statistics)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.autocast(x_device(x).type, dtype or torch.bfloat16, enabled=dtype is not None):
        loss = F.cross_entropy(run(model, x).float(), y)
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads)


def x_device(x) -> torch.device:
    return next(iter(x.values())).device if isinstance(x, dict) else x.device


def check_one(name: str, mode: str, device: torch.device, steps: int, size: int) -> Case:
    case = Case(name, mode)
    base_dtype, amp, scaled = MODES[mode]
    torch.manual_seed(0)
    base, x, y, adapter, options, criterion = MODELS[name](size)
    base = base.to(device, base_dtype).eval()
    x, y = to(x, device, base_dtype), y.to(device)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sparta.wrap(base, adapter, **options)
    case.check(
        not off_device(model, device), f"wrapped off device: {off_device(model, device)[:3]}"
    )
    if amp is not None:  # the first step's gradients against fp32
        err = rel(gradients(model, x, y, amp), gradients(model, x, y, None))
        case.notes["grad err"] = f"{err:.1e}"
        case.check(err <= GRAD_TOL[amp], f"gradients {err:.2e} from fp32 > {GRAD_TOL[amp]}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=1e-2, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if scaled else None
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, amp or torch.bfloat16, enabled=amp is not None):
            out = run(model, x)
        case.check(amp is None or out.dtype == amp, f"output {out.dtype} under autocast {amp}")
        loss = F.cross_entropy(out.float(), y)
        losses.append(loss.item())
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    case.notes["loss"] = f"{losses[0]:.3f}->{losses[-1]:.3f}"
    case.check(all(map(lambda v: v == v and abs(v) < 1e9, losses)), f"losses {losses}")

    model.eval()
    pruner = sparta.Pruner(model, x, criterion=criterion, target="density=0.5")
    if criterion == "taylor":
        pruner.score(
            [(x, y)], lambda out, t: F.cross_entropy(getattr(out, "logits", out).float(), t)
        )
    pruner.step()
    case.check(not off_device(model, device), f"masked off device: {off_device(model, device)[:3]}")
    with tempfile.TemporaryDirectory() as tmp:
        export(model).save(Path(tmp) / "task.safetensors")
        compact = build(base, Task.load(Path(tmp) / "task.safetensors"))
    case.check(
        not off_device(compact, device), f"compact off device: {off_device(compact, device)[:3]}"
    )
    dtypes = {t.dtype for t in [*compact.parameters(), *compact.buffers()] if t.is_floating_point()}
    case.check(dtypes == {base_dtype}, f"compact dtypes {dtypes}, base {base_dtype}")
    with torch.no_grad():
        want, got = run(model, x), run(compact, x)
        diff = max_rel(got, want)
        if amp is not None:
            with torch.autocast(device.type, amp):
                low = run(compact, x)
            case.check(low.dtype == amp, f"compact under autocast gives {low.dtype}")
    case.notes["compact diff"] = f"{diff:.1e}"
    case.check(diff <= OUT_TOL[base_dtype], f"compact vs masked {diff:.2e} > {OUT_TOL[base_dtype]}")
    params = sum(p.numel() for p in compact.parameters()) / sum(
        p.numel() for p in base.parameters()
    )
    case.notes["params"] = f"{params:.2f}"
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, before[k])]
    case.check(not changed, f"base changed: {changed[:3]}")
    return case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="image side for resnet18")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            print("no CUDA device: running on the CPU (pass --device to choose)")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    print(f"torch {torch.__version__}, device {name}, TF32 conv/matmul {tf32}")
    header = f"{'model':<9} {'mode':<21} {'time':>6}  result"
    print(header + "\n" + "-" * len(header))
    failed = 0
    for model_name in args.models:
        for mode in MODES:
            start = time.perf_counter()
            try:
                case = check_one(model_name, mode, device, args.steps, args.size)
            except Exception as exc:  # a crash is a failed row, reported with its trace
                case = Case(model_name, mode, failures=[f"{type(exc).__name__}: {exc}"])
                traceback.print_exc()
            took = time.perf_counter() - start
            notes = ", ".join(f"{k} {v}" for k, v in case.notes.items())
            status = "ok" if not case.failures else "FAIL " + "; ".join(case.failures)
            print(f"{model_name:<9} {mode:<21} {took:5.1f}s  {status}  ({notes})", flush=True)
            failed += bool(case.failures)
    print(f"{failed} of {len(args.models) * len(MODES)} checks failed" if failed else "all ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
