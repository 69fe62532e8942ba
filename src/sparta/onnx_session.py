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
):
    """``(session, runner)`` for ``module`` called on the tensors ``leaves`` (positionally),
    exported in memory (no file) with a dynamic batch axis (dim 0 of every input) and opened
    with every graph optimisation and ``threads`` intra-op threads.

    torch's tracing exporter first: it takes a fraction of the time of the ``torch.export`` one
    (0.7 s vs 4.7 s for a ResNet-18, which matters when a bank deploys a task on a switch); the
    ``torch.export`` one where the tracing one fails, warns that it fixed an input-dependent
    value, or gives a graph that ``problem(runner)`` rejects (ONNX Runtime cannot run it, e.g.
    'same' padding with dilation, or it differs from the model on the example). Raises the last
    failure when neither exporter gives an accepted session.
    """
    names = [f"input_{i}" for i in range(len(leaves))]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
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
