"""ONNX Runtime behind :func:`sparta.deploy`: export a module in memory, open a session.

The optional extra (``pip install 'sparta[onnx]'``) is imported here, lazily, only when a model
is deployed to ``runtime="onnxruntime"``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import ConfigError

ONNX_HINT = "pip install 'sparta[onnx]'"

#: A session's runner: the flat input tensors in, the flat output tensors out.
Runner = Callable[[list[Tensor]], list[Tensor]]

#: ONNX Runtime's blocked (NCHWc) convolutions compute channels in blocks of 16 on AVX-512 CPUs
#: (8 on AVX2): a count in between is padded up, and its padding is computed like kept channels.
BLOCK = 16


class ExportRefused(Exception):
    """An exporter's graph is not trusted for inputs other than the example."""


def load_onnxruntime():
    """The ``onnxruntime`` module (with ``onnx`` and ``onnxscript``, which the export needs), or
    a ConfigError naming the extra to install."""
    try:
        for name in ("onnx", "onnxscript"):
            importlib.import_module(name)
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ConfigError(
            f"runtime 'onnxruntime' needs onnxruntime, onnx and onnxscript ({exc}); install "
            f"them with: {ONNX_HINT}"
        ) from None


def onnx_session(
    module: nn.Module,
    leaves: tuple,
    threads: int,
    ort,
    problem: Callable[[Runner], str | None],
    spin: bool = False,
    profile: str | None = None,
):
    """``(session, runner)`` for ``module`` called on the tensors ``leaves`` (positionally),
    exported in memory (no file) with a dynamic batch axis (dim 0 of every input) and opened
    with :func:`session_options` (``threads``, ``spin`` and ``profile`` as there).

    torch's tracing exporter first: it takes a fraction of the time of the ``torch.export`` one
    (0.7 s vs 4.7 s for a ResNet-18, which matters when a bank deploys a task on a switch); the
    ``torch.export`` one where the tracing one fails, warns that it fixed an input-dependent
    value, or gives a graph that ``problem(runner)`` rejects (ONNX Runtime cannot run it, e.g.
    'same' padding with dilation, or it differs from the model on the example). Raises the last
    failure when neither exporter gives an accepted session.
    """
    names = [f"input_{i}" for i in range(len(leaves))]
    options = session_options(ort, threads, spin, profile)
    failure: Exception | None = None
    for exporter in (_traced_onnx, _dynamo_onnx):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # the exporters' advice and progress prints
                data = exporter(module, leaves, names)
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            runner = _runner(session, names)
            bad = problem(runner)
        except Exception as exc:  # noqa: BLE001 - the next exporter, or raised below
            failure = exc
            continue
        if bad is None:
            return session, runner
        failure = ExportRefused(bad)
    raise failure


def session_options(ort, threads: int, spin: bool = False, profile: str | None = None):
    """The ``SessionOptions`` sparta serves with: every graph optimisation (level 3: on x86 it
    includes the NCHWc layout transformer, whose blocked convolutions were 2x faster than the
    level-2 graph for a compact ResNet-50 at batch 1), ``threads`` intra-op threads, no inter-op
    pool (one operator at a time).

    ``spin``: the worker threads spin-wait between the operators *of a call* instead of sleeping
    and being woken for each parallel operator, and stop spinning as soon as the call returns
    (``session.force_spinning_stop``), so an idle session takes no CPU from the next model a
    bank runs. Without it every parallel operator pays a thread wake-up, which is most of a
    thin (pruned) layer's time at batch 1; on an oversubscribed CPU spinning costs more than it
    gains (a spinning thread waits for a core). ``profile``: a file prefix; the session writes
    ONNX Runtime's per-operator profile there (``session.end_profiling()`` names the file).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if profile is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile
    return options


def _runner(session, names: list[str]) -> Runner:
    wanted = [i.name for i in session.get_inputs()]  # an exporter may drop an unused input
    index = {name: i for i, name in enumerate(names)}

    def run(flat):
        feed = {n: flat[index[n]].detach().cpu().contiguous().numpy() for n in wanted}
        device = flat[0].device if flat else torch.device("cpu")
        return [torch.from_numpy(o).to(device) for o in session.run(None, feed)]

    return run


def _traced_onnx(module: nn.Module, leaves: tuple, names: list[str]) -> bytes:
    """Refused when tracing warned that the graph may hold on to a value or shape of the
    example (a branch on a tensor, a size turned into a Python number): ``torch.export``
    refuses or generalises those soundly."""
    buffer = io.BytesIO()
    dynamic = {n: {0: "batch"} for n, t in zip(names, leaves) if t.dim()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            module, leaves, buffer, dynamo=False, input_names=names, dynamic_axes=dynamic
        )
    traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if traced:
        raise ExportRefused(f"tracing may have fixed an input-dependent value: {traced[0].message}")
    return buffer.getvalue()


def _dynamo_onnx(module: nn.Module, leaves: tuple, names: list[str]) -> bytes:
    batch = torch.export.Dim.DYNAMIC  # the leaves are one *args: one tuple of specs
    dynamic = tuple({0: batch} if t.dim() else {} for t in leaves)
    program = torch.onnx.export(
        module, leaves, dynamo=True, input_names=names, dynamic_shapes=(dynamic,), report=False
    )
    return program.model_proto.SerializeToString()


@contextlib.contextmanager
def blocked_padding(model: nn.Module, block: int = BLOCK):
    """While active, count the multiply-accumulates of every 2-D convolution ``model`` runs, as
    they are and with channel counts padded to multiples of ``block`` as ONNX Runtime's blocked
    kernels compute them (output channels always; input channels from ``block`` up, a thinner
    input such as an image's 3 channels is read unpadded; depthwise layers per channel; other
    grouped convolutions are not blocked). Yields a dict that holds, on exit, ``macs``,
    ``padded`` and ``layers``/``padded_layers`` (how many convolutions ran / were padded)."""
    counts = {"macs": 0, "padded": 0, "layers": 0, "padded_layers": 0}

    def up(n: int) -> int:
        return -(-n // block) * block

    def hook(conv: nn.Conv2d, _inputs, output: Tensor) -> None:
        out, cin, taps = (
            conv.out_channels,
            conv.in_channels // conv.groups,
            conv.weight[0, 0].numel(),
        )
        pixels = output.numel() // out
        if conv.groups == 1:
            padded = up(out) * (up(cin) if conv.in_channels >= block else cin)
        elif conv.groups == conv.in_channels == out:
            padded = up(out)
        else:
            padded = out * cin
        counts["macs"] += pixels * taps * out * cin
        counts["padded"] += pixels * taps * padded
        counts["layers"] += 1
        counts["padded_layers"] += padded != out * cin

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def padding_note(counts: dict, block: int = BLOCK) -> str | None:
    """What :func:`blocked_padding`'s counts cost, in words, when padding adds 1% or more."""
    extra = counts["padded"] / counts["macs"] - 1 if counts["macs"] else 0.0
    if extra < 0.01:
        return None
    return (
        f"{counts['padded_layers']} of {counts['layers']} convolutions have channel counts that "
        f"are not multiples of {block}: ONNX Runtime's blocked kernels pad them, {extra:.0%} more "
        f"MACs than the model counts (prune with round_to={block} to avoid it)"
    )
