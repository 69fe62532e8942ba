"""``TaskBank``: one shared base, many tasks, each deployed as its own compact model.

Switching task is fetching that task's compact model: built on first use (checking the base's
fingerprint, rebuilding, fusing, cutting) and kept in a least-recently-used cache of bounded
size. The base is never changed and no model shares storage with it or with another task's
model. With a ``directory`` the bank persists: every task is a ``<name>.safetensors`` file
there (written atomically), and opening the bank again finds them.

A task is verified once, when it is added: its compact model is built and its outputs are
compared with the masked task model's on the task's recorded inputs (within 1e-4 of the
largest output, relative; see :func:`~sparta.tasks.build_compact`). A task that fails is
never registered and leaves no file. A file in the folder that cannot be read or does not fit
the base does not stop the bank from opening: it is listed in :attr:`TaskBank.errors` with its
error, and the other tasks are served. Tasks found in the folder are verified on first use.
"""

from __future__ import annotations

import errno
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..errors import ConfigError, FileError, SpartaError, UnknownNameError
from ..runtime import RUNTIMES, Deployed, deploy
from .accounting import Report, TaskAccount, account, density, task_bytes
from .artifact import ArtifactError, Task
from .build import Builder
from .compact import CompactReport
from .manifest import check_manifest, check_tensors

SUFFIX = ".safetensors"
MAX_NAME = 200  # with the suffix, well within the 255 bytes most file systems allow
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class TaskInfo:
    """A task in a bank. ``params``, ``macs`` and ``density`` describe the compact model and
    are ``None`` until it has been built (see :meth:`TaskBank.info`)."""

    name: str
    adapter: str
    bytes: int
    learned_parameters: int
    params: int | None = None
    macs: int | None = None
    density: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class TaskBank:
    """Tasks on one ``base`` model.

    Args:
        base: the plain base model the tasks were trained on (never modified).
        directory: where task files live (created if missing); ``None`` keeps tasks in memory.
        cache_size: how many compact models to keep built at once (least recently used go).
        example_inputs: the batch to trace and count MACs with; default: each task's own.
        verify: check every build against the masked task model, not only the first one
            (each task is always verified once: when added, or on first use if it was found
            in the folder); slower switches.

    Example::

        bank = sparta.TaskBank(base, "tasks/")
        bank.add("cats", "cats.safetensors")
        logits = bank.model("cats")(images)
    """

    def __init__(
        self,
        base: nn.Module,
        directory: str | Path | None = None,
        cache_size: int = 4,
        example_inputs=None,
        verify: bool = False,
    ):
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ConfigError(f"cache_size must be an integer >= 1, got {cache_size!r}")
        self.builder = Builder(base, example_inputs)
        self.cache_size, self.verify = cache_size, verify
        self.directory = None if directory is None else _folder(directory)
        self._tasks: dict[str, Task] = {}
        self._info: dict[str, TaskInfo] = {}
        self._accounts: dict[str, TaskAccount] = {}
        self._models: OrderedDict[str, nn.Module] = OrderedDict()
        self._reports: dict[str, CompactReport] = {}
        self._deployed: OrderedDict[tuple[str, str, int | None], Deployed] = OrderedDict()
        self._verified: set[str] = set()
        #: ``{file name: error}`` of the files in the folder that are not usable tasks.
        self.errors: dict[str, str] = {}
        if self.directory is not None:
            for path in _task_files(self.directory):
                self._open(path)

    @property
    def base(self) -> nn.Module:
        return self.builder.base

    # -- the collection -------------------------------------------------------------------------
    def add(self, name: str, task: Task | str | Path, overwrite: bool = False) -> TaskInfo:
        """Add ``task`` (a :class:`Task` or a task file) as ``name``, after verifying it once
        (see the module docstring); refuses a task trained on another base, a task whose
        compact model does not reproduce it, and an existing name unless ``overwrite``.
        On any refusal nothing changes: no task is registered and no file is written."""
        _check_name(name)
        file = f"{name}{SUFFIX}"
        if (name in self._tasks or file in self.errors) and not overwrite:
            raise ConfigError(f"task {name!r} is already in the bank (pass overwrite=True)")
        if isinstance(task, Task):  # a file is checked when read; an object here
            check_manifest(task.manifest, f"<task {name}>")
            check_tensors(task.tensors, task.manifest, f"<task {name}>")
        else:
            task = Task.load(task)
        self.builder.check(task)
        model, report = self._verified_build(name, task)
        if self.directory is not None:
            task.save(self.directory / file)
        self._drop(name)
        self.errors.pop(file, None)
        info = self._register(name, task)
        self._verified.add(name)
        self._keep(name, model, report)
        return info

    def remove(self, name: str) -> None:
        """Forget task ``name`` (and delete its file from the bank's directory); also deletes
        an unusable file listed in :attr:`errors` under that name."""
        file = f"{name}{SUFFIX}"
        if file in self.errors and name not in self._tasks:
            del self.errors[file]
        else:
            self._get(name)
            self._drop(name)
            del self._tasks[name], self._info[name]
            self._verified.discard(name)
        if self.directory is not None:
            try:
                (self.directory / file).unlink(missing_ok=True)
            except OSError as exc:
                raise FileError(f"cannot delete {str(self.directory / file)!r}: {exc}") from None

    def task(self, name: str) -> Task:
        return self._get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    # -- models -----------------------------------------------------------------------------------
    def model(self, name: str) -> nn.Module:
        """The compact model of task ``name`` (eval mode), built on first use and cached.

        The cached model is returned as is: edit a copy if you need a different one."""
        task = self._get(name)
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        if name in self._verified and not self.verify:
            model, report = self.builder.build(task, verify=False)
        else:
            try:
                model, report = self._verified_build(name, task)
            except ArtifactError as exc:  # found in the folder, never verified: now unusable
                self._drop(name)
                del self._tasks[name], self._info[name]
                self.errors[f"{name}{SUFFIX}"] = str(exc)
                raise
            self._verified.add(name)
        return self._keep(name, model, report)

    def _verified_build(self, name: str, task: Task) -> tuple[nn.Module, CompactReport]:
        """Build ``task`` and compare its compact model with its masked model; any failure is
        one :class:`ArtifactError` naming the task."""
        try:
            return self.builder.build(task, verify=True)
        except SpartaError as exc:
            raise ArtifactError(f"task {name!r} failed verification on this base: {exc}") from exc
        except Exception as exc:  # from deep inside torch: still the task's failure
            raise ArtifactError(
                f"task {name!r} cannot be built on this base ({type(exc).__name__}: {exc})"
            ) from exc

    def _keep(self, name: str, model: nn.Module, report: CompactReport) -> nn.Module:
        model.eval()
        info = self._info[name]
        info.params = sum(p.numel() for p in model.parameters())
        info.density = density(report)
        self._models[name], self._reports[name] = model, report
        self._models.move_to_end(name)
        while len(self._models) > self.cache_size:
            self._models.popitem(last=False)
        return model

    def deployed(self, name: str, runtime: str = "onnxruntime", threads: int | None = None):
        """Task ``name`` served by ``runtime`` (see :func:`sparta.deploy`): a callable taking
        the model's inputs, checked once against its compact model on the bank's example
        inputs (else the task's recorded ones). Deploying costs far more than a switch
        (exporting a compact ResNet-50 to ONNX Runtime takes about half a second), so each
        deployment is kept, ``cache_size`` of them at most, least recently used dropped.

        Example::

            serve = bank.deployed("cats", runtime="onnxruntime")
            logits = serve(images)
        """
        if runtime not in RUNTIMES:
            raise UnknownNameError("runtime", runtime, RUNTIMES)
        key = (name, runtime, threads)
        if key in self._deployed:
            self._get(name)  # still registered
            self._deployed.move_to_end(key)
            return self._deployed[key]
        model = self.model(name)
        inputs = self.builder.inputs(self._get(name))
        served = deploy(model, inputs, runtime=runtime, threads=threads)
        self._deployed[key] = served
        while len(self._deployed) > self.cache_size:
            self._deployed.popitem(last=False)
        return served

    @property
    def cached(self) -> list[str]:
        """Names whose compact model is built and cached, least recently used first."""
        return list(self._models)

    def info(self, name: str, measure: bool = True) -> TaskInfo:
        """Facts about task ``name``; ``measure`` builds it (if needed) to fill in the compact
        model's parameters, MACs and density."""
        task = self._get(name)
        if measure and name not in self._accounts:
            model = self.model(name)
            self._accounts[name] = account(
                name, task, model, self._reports[name], self.base, self.builder.inputs(task)
            )
            self._info[name].macs = self._accounts[name].macs
        return self._info[name]

    def list(self, measure: bool = False) -> list[TaskInfo]:
        return [self.info(n, measure) for n in self.names]

    def report(self) -> Report:
        """:func:`sparta.report` of every task in the bank (builds each one)."""
        for name in self.names:
            self.info(name, measure=True)
        return Report([self._accounts[n] for n in self.names])

    # -- internals ------------------------------------------------------------------------------
    def _open(self, path: Path) -> None:
        """Register the task in ``path`` (found in the folder), or list it in :attr:`errors`."""
        name = path.name[: -len(SUFFIX)]
        try:
            _check_name(name)
            task = Task.load(path)
            self.builder.check(task)
        except SpartaError as exc:
            self.errors[path.name] = str(exc)
            return
        self._register(name, task)

    def _register(self, name: str, task: Task) -> TaskInfo:
        self._tasks[name] = task
        self._info[name] = TaskInfo(
            name=name,
            adapter=task.adapter,
            bytes=task_bytes(task),
            learned_parameters=int(task.manifest["counts"]["learned_parameters"]),
        )
        return self._info[name]

    def _drop(self, name: str) -> None:
        for key in [k for k in self._deployed if k[0] == name]:
            del self._deployed[key]
        self._models.pop(name, None)
        self._reports.pop(name, None)
        self._accounts.pop(name, None)

    def _get(self, name: str) -> Task:
        if name not in self._tasks:
            error = self.errors.get(f"{name}{SUFFIX}") if isinstance(name, str) else None
            if error is not None:
                raise ArtifactError(f"task {name!r} of this bank is unusable: {error}")
            raise UnknownNameError("task", name, self._tasks)
        return self._tasks[name]


def _check_name(name) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:57])
        raise ConfigError(
            f"task name must be 1 to {MAX_NAME} letters, digits, '_', '-' or '.', starting "
            f"with a letter or digit, got {shown}"
            + (f"... ({len(name)} characters)" if isinstance(name, str) and len(name) > 60 else "")
        )


def _folder(directory) -> Path:
    """The bank's folder, created if missing; a path that is a file is refused."""
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"directory must be a path (str or Path), got {type(directory).__name__}")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        err = FileError(
            f"bank directory {str(path)!r} is a file, not a folder; give the folder that holds "
            "(or is to hold) the task files"
        )
        err.errno = errno.ENOTDIR
        raise err
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileError(
            f"cannot create bank directory {str(path)!r}: {exc.strerror or exc}"
        ) from None
    return path


def _task_files(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except OSError as exc:
        raise FileError(
            f"cannot list bank directory {str(directory)!r}: {exc.strerror or exc}"
        ) from None
