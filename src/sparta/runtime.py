"""``sparta.deploy``: run a (compact, plain-torch) model in an inference runtime, checked.

A compact task model is a plain PyTorch model, so any runtime can serve it; what differs is the
per-operator overhead, which dominates thin pruned layers (issue #13: at batch 1 a ResNet-50 at
9.6x fewer MACs ran 3.2x faster in eager PyTorch, 4.1x in frozen TorchScript, 9.0x in ONNX
Runtime). :func:`deploy` returns a :class:`Deployed` callable that takes the model's inputs and
returns its outputs as torch tensors, after checking on the example inputs that the runtime
reproduces the eager model (within 1e-4 of the largest output, relative, for float32).

Runtimes:

* ``"eager"``: a copy of the model in eval mode under ``torch.inference_mode``, with every
  BatchNorm that directly follows a convolution (or linear layer) folded into it by torch's own
  ``torch.fx.experimental.optimization.fuse`` where the model traces and the fold is exact, and
  in channels-last memory format (4-D convolution models; ``channels_last=None`` decides).
* ``"torchscript"``: traced, frozen and ``torch.jit.optimize_for_inference`` (which folds
  BatchNorm and fuses convolutions with their activations).
* ``"onnxruntime"``: exported in memory (``torch.onnx.export``, no file) with a dynamic batch
  axis, served by an ``onnxruntime.InferenceSession`` with every graph optimisation (BatchNorm,
  ReLU and residual additions fused into blocked NCHWc convolutions) and ``threads`` (default
  ``torch.get_num_threads()``) intra-op threads that spin between the operators of a call and
  stop when it returns (see :func:`~sparta.onnx_session.session_options`). Needs the optional
  extra: ``pip install 'sparta[onnx]'``.

Where a thin model loses speed at batch 1 (measured for a ResNet-50 pruned to 9-10x fewer MACs,
ONNX Runtime, 2 threads): (1) waking a sleeping worker thread for every parallel operator
(48 us per convolution, median, on a shared machine: 2 threads ran the compact model slower
than 1) -- spinning within a call cuts it to 9 us; (2) the
blocked kernels pad channel counts to multiples of 16 (AVX-512; 8 on AVX2): counts rounded to 8
cost 16% more MACs than they count, and a 24-channel stem left its max-pool unblocked -- prune
with ``round_to=16`` (the notes say how many MACs padding adds); (3) what remains is ~9 us of
thread synchronisation per parallel operator, ~0.5 ms over a ResNet-50's 53 convolutions (the
executor's own cost is under 1 us per operator and ~7 us per call). ``benchmarks/deploy.py``
measures all three.

Inputs are what the model takes: a tensor, positional tensors or keyword tensors (Hugging Face
style), the same structure as the example inputs. Outputs keep the model's structure (a tensor,
a tuple or a dict of tensors); for a Hugging Face style output (an object with ``logits``) the
deployed model returns the logits and says so in :attr:`Deployed.output`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .errors import ConfigError, SpartaError, UnknownNameError
from .inputs import input_spec
from .onnx_session import blocked_padding, load_onnxruntime, onnx_session, padding_note
from .outputs import difference, hf_logits, pick, tolerance_of

RUNTIMES = ("eager", "torchscript", "onnxruntime")


class DeployError(SpartaError, RuntimeError):
    """A runtime could not take the model, or does not reproduce its outputs (the message says
    which runtime, what happened and what to try instead)."""


class Deployed:
    """A model served by one runtime: call it like the model.

    Attributes:
        runtime: ``"eager"``, ``"torchscript"`` or ``"onnxruntime"``.
        output: ``"logits"`` when the model returns a Hugging Face style output and the logits
            are what this returns; ``None`` when it returns what the model returns.
        error: the relative difference from the eager model on the example inputs (``None``
            when deployed with ``check=False``).
        notes: what the deployment changed (BatchNorm folded, memory format, threads) and,
            for ONNX Runtime, how many MACs its blocked kernels add by padding channel counts
            (see :func:`~sparta.onnx_session.blocked_padding`).
        threads: intra-op threads (``None``: torch's current setting at each call).
        module: eager and TorchScript: the module that runs (the model's copy, BatchNorm
            folded; the frozen TorchScript module).
        session: ONNX Runtime: its ``InferenceSession``.
    """

    module: nn.Module | None = None
    session = None

    def __init__(self, runtime: str, run: Callable, layout: _Layout, threads: int | None):
        self.runtime, self._run, self._layout, self.threads = runtime, run, layout, threads
        self.output = layout.output
        self.error: float | None = None
        self.notes: list[str] = []

    def __call__(self, *args, **kwargs):
        leaves = self._layout.inputs(args, kwargs, self.runtime)
        with _threads(self.threads if self.runtime != "onnxruntime" else None):
            return self._layout.outputs(self._run(leaves))

    def __repr__(self) -> str:
        notes = f"; {', '.join(self.notes)}" if self.notes else ""
        return f"Deployed(runtime={self.runtime!r}{notes})"


def deploy(
    model: nn.Module,
    example_inputs,
    runtime: str = "eager",
    check: bool = True,
    threads: int | None = None,
    channels_last: bool | None = None,
    fold_bn: bool = True,
    spin: bool = True,
) -> Deployed:
    """``model`` served by ``runtime``, checked against the eager model on ``example_inputs``.

    Args:
        model: a plain PyTorch model (e.g. from :func:`sparta.build`); never modified: the
            runtime works on a copy in eval mode.
        example_inputs: a tensor, a tuple of tensors (positional) or a dict of tensors (keyword
            arguments), as the model takes them; the batch to export and check with.
        runtime: one of :data:`RUNTIMES`.
        check: compare the deployed outputs with the eager model's on ``example_inputs``
            (1e-4 of the largest output, relative, in float32) and raise
            :class:`DeployError` when they differ.
        threads: intra-op threads the runtime uses (``None``: ``torch.get_num_threads()``).
        channels_last: eager and TorchScript: run 4-D convolutions in channels-last memory
            format; ``None``: in eager when the model has a 2-D convolution (BatchNorm folding
            and channels last together: 1.7x at batch 1, 1.9x at batch 32 for a compact
            ResNet-50; TorchScript's own MKLDNN layout makes it no faster there).
        fold_bn: eager: fold BatchNorm into the convolution it follows, where exact.
        spin: ONNX Runtime: its worker threads spin-wait between the operators of a call
            and stop when the call returns, so an idle session takes no CPU from other models
            (ONNX Runtime's own default spins on after each call too: two such sessions called
            in turn ran a ResNet-50 at 57-61 ms instead of 32 ms). Measured at batch 1 on 2
            threads: ResNet-50 31 vs 41 ms, its 9x-pruned compact 4.5-4.9 vs 5.8 ms (median of
            100, interleaved). ``False`` where the CPU is oversubscribed (more busy threads
            than cores): a spinning thread then waits for a core and is slower than sleeping.

    Raises:
        UnknownNameError: ``runtime`` is not one of :data:`RUNTIMES`.
        ConfigError: ``model`` is not a module, inputs are not tensors, ``threads`` is not a
            positive integer, ``spin`` not a bool, or onnxruntime is missing
            (``pip install 'sparta[onnx]'``).
        DeployError: the model fails on the inputs, cannot be exported, or the runtime's
            outputs differ from the model's.
    """
    if runtime not in RUNTIMES:
        raise UnknownNameError("runtime", runtime, RUNTIMES)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"deploy needs a torch.nn.Module (e.g. from sparta.build), got {type(model).__name__}"
        )
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(f"threads must be an integer >= 1 or None, got {threads!r}")
    if not isinstance(spin, bool):
        raise ConfigError(f"spin must be True or False, got {spin!r}")
    input_spec(example_inputs)  # a tensor or a tuple/list/dict of tensors, or a ConfigError
    ort = load_onnxruntime() if runtime == "onnxruntime" else None
    copied = _eval_copy(model)
    args, kwargs = _split(example_inputs)
    padding = blocked_padding(copied) if ort is not None else nullcontext(None)
    with _threads(threads), torch.inference_mode(), padding as counts:
        want = _reference(copied, args, kwargs)
    layout = _Layout(args, kwargs, want)
    if channels_last is None:  # measured: see the module notes
        channels_last = runtime == "eager" and any(
            isinstance(m, nn.Conv2d) for m in copied.modules()
        )
    make = {"eager": _eager, "torchscript": _torchscript, "onnxruntime": _onnx}[runtime]
    deployed = make(copied, layout, threads, channels_last, fold_bn, ort, spin)
    deployed.notes += [note] if counts and (note := padding_note(counts)) else []
    if check:
        deployed.error = _compare(deployed, args, kwargs, want, runtime)
    return deployed


# -- inputs and outputs ---------------------------------------------------------------------------
class _Layout:
    """How the call's tensors flatten into the runtime's inputs, and its outputs back."""

    def __init__(self, args: tuple, kwargs: dict, want):
        self.example, self.want = (args, kwargs), want
        self.names = list(kwargs)
        leaves, self.in_spec = pytree.tree_flatten((args, kwargs))
        self.count = len(leaves)
        self.output = "logits" if hf_logits(want) is not None else None
        out_leaves, self.out_spec = pytree.tree_flatten(pick(want))
        bad = [type(x).__name__ for x in out_leaves if not isinstance(x, Tensor)]
        if bad:
            raise DeployError(
                f"deploy serves models that return tensors (or tuples/dicts of them); this one "
                f"also returns {', '.join(sorted(set(bad)))}: wrap it to return tensors only"
            )

    def inputs(self, args: tuple, kwargs: dict, runtime: str) -> list[Tensor]:
        if set(kwargs) == set(self.names):
            kwargs = {k: kwargs[k] for k in self.names}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise ConfigError(
                f"the {runtime} deployment was made for {self._describe(self.in_spec)}; got "
                f"{self._describe(spec)}: call it with the example inputs' structure (or deploy "
                "again with inputs of the new structure)"
            )
        return leaves

    @staticmethod
    def _describe(spec) -> str:
        args, kwargs = pytree.tree_unflatten(["T"] * spec.num_leaves, spec)
        return f"positional {list(args)} and keyword {sorted(kwargs)} tensors"

    def outputs(self, leaves):
        return pytree.tree_unflatten(list(leaves), self.out_spec)


class _Flat(nn.Module):
    """The model as a function of its flat input tensors, returning a tuple of tensors (what
    tracing and ONNX export take)."""

    def __init__(self, model: nn.Module, layout: _Layout):
        super().__init__()
        self.model, self._layout = model, layout

    def forward(self, *leaves):
        args, kwargs = pytree.tree_unflatten(list(leaves), self._layout.in_spec)
        return tuple(pytree.tree_leaves(pick(self.model(*args, **kwargs))))


def _split(inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


# -- runtimes -------------------------------------------------------------------------------------
def _eager(model, layout, threads, channels_last, fold_bn, ort, spin) -> Deployed:
    notes = []
    if fold_bn:
        model, folded = _fold_bn(model, layout)
        if folded:
            notes.append(f"BatchNorm folded into {folded} layers")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        notes.append("channels_last")

    def run(leaves):
        args, kwargs = pytree.tree_unflatten(leaves, layout.in_spec)
        with torch.inference_mode():
            return pytree.tree_leaves(pick(model(*args, **kwargs)))

    deployed = Deployed("eager", run, layout, threads)
    deployed.notes, deployed.module = notes, model
    return deployed


def _fold_bn(model: nn.Module, layout: _Layout) -> tuple[nn.Module, int]:
    """``model`` with BatchNorm folded into the layer before it (torch's fx pass), and how many
    were folded; the model unchanged when it does not trace symbolically or the fold is not
    exact on the example (a shared layer, a norm over another axis)."""
    from torch.fx.experimental.optimization import fuse

    norms = nn.modules.batchnorm._BatchNorm
    before = sum(isinstance(m, norms) for m in model.modules())
    if not before:
        return model, 0
    args, kwargs = layout.example
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = fuse(model, inplace=False)
        with torch.inference_mode():
            error = difference(fused(*args, **kwargs), layout.want)
    except Exception:  # noqa: BLE001 - any tracing failure: keep the model as it is
        return model, 0
    if error > tolerance_of(layout.want):
        return model, 0
    return fused, before - sum(isinstance(m, norms) for m in fused.modules())


def _torchscript(model, layout, threads, channels_last, fold_bn, ort, spin) -> Deployed:
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    leaves = pytree.tree_leaves(layout.example)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), _threads(threads):
            warnings.simplefilter("always")
            traced = torch.jit.trace(_Flat(model, layout), tuple(leaves), check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    except Exception as exc:  # noqa: BLE001 - reported with its cause
        raise _export_error("torchscript", "trace and freeze", exc) from exc

    def run(flat):
        with torch.inference_mode():
            return _as_tuple(frozen(*flat))

    deployed = Deployed("torchscript", run, layout, threads)
    deployed.notes = ["traced, frozen, optimized for inference"]
    tracer = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer:  # valid for inputs like the example's only (e.g. Hugging Face's shape checks)
        deployed.notes.append(f"{len(tracer)} tracer warnings, first: {tracer[0][:120]}")
    deployed.notes += ["channels_last"] if channels_last else []
    deployed.module = frozen
    return deployed


def _onnx(model, layout, threads, channels_last, fold_bn, ort, spin) -> Deployed:
    """Exported in memory and served by an ONNX Runtime session (see
    :func:`~sparta.onnx_session.onnx_session`; the example is always run once to pick the
    exporter)."""
    leaves = tuple(pytree.tree_leaves(layout.example))
    tol, threads_used = tolerance_of(layout.want), threads or torch.get_num_threads()

    def problem(run) -> str | None:
        error = difference(layout.outputs(run(list(leaves))), layout.want)
        return None if error <= tol else f"outputs differ by {error:.2e} of the largest"

    try:
        session, run = onnx_session(
            _Flat(model, layout), leaves, threads_used, ort, problem, spin=spin
        )
    except Exception as exc:  # noqa: BLE001 - reported with its cause
        raise _export_error("onnxruntime", "export and run", exc) from exc
    deployed = Deployed("onnxruntime", run, layout, threads)
    deployed.notes = [f"ONNX Runtime {ort.__version__}, intra-op threads {threads_used}"]
    deployed.notes += ["threads spin within a call"] if spin else []
    deployed.session = session
    return deployed


# -- checks and helpers ---------------------------------------------------------------------------
def _reference(model: nn.Module, args: tuple, kwargs: dict):
    try:
        return model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported with its cause
        raise DeployError(
            f"the model fails on the example inputs ({type(exc).__name__}: {exc}); pass inputs "
            "it takes (a tensor, a tuple of positional tensors or a dict of keyword tensors)"
        ) from exc


def _compare(deployed: Deployed, args, kwargs, want, runtime: str) -> float:
    try:
        got = deployed(*args, **kwargs)
    except SpartaError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with its cause
        raise DeployError(f"the {runtime} deployment fails on the example inputs: {exc}") from exc
    error, tol = difference(got, want), tolerance_of(want)
    if error > tol:
        raise DeployError(
            f"the {runtime} deployment does not reproduce the model: largest difference "
            f"{error:.2e} of the largest output (at most {tol:.0e} expected); deploy with "
            "runtime='eager' (or fold_bn=False, channels_last=False) to serve it unchanged"
        )
    return error


def _export_error(runtime: str, what: str, exc: Exception) -> DeployError:
    first = _summary(str(exc))
    return DeployError(
        f"{runtime} could not {what} the model ({type(exc).__name__}: {first}); the model must "
        "trace with tensor inputs and outputs and no data-dependent control flow; serve it "
        "with runtime='eager' instead"
    )


def _summary(text: str) -> str:
    """The line of an exporter's message that says what went wrong (torch.onnx puts it
    under '## Exception summary', after its advice)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :]
    return lines[0][:300] if lines else ""


def _eval_copy(model: nn.Module) -> nn.Module:
    try:
        copied = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - reported with its cause
        raise DeployError(f"the model cannot be copied to deploy ({exc})") from exc
    copied.eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple | list) else (out,)


@contextmanager
def _threads(threads: int | None):
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
