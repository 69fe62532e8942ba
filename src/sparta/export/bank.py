"""``TaskBank``: one shared base, many tasks, each deployed as its own compact model.

Switching task is fetching that task's compact model: built on first use (checking the base's
fingerprint, rebuilding, fusing, cutting) and kept in a least-recently-used cache of bounded
size. The base is never changed and no model shares storage with it or with another task's
model. With a ``directory`` the bank persists: every task is a ``<name>.safetensors`` file
there (written atomically), and opening the bank again finds them.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..errors import ConfigError, UnknownNameError
from .accounting import Report, TaskAccount, account, density, task_bytes
from .artifact import Task
from .build import Builder
from .compact import CompactReport

SUFFIX = ".safetensors"
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
        verify: check every built model against the masked task model (slower switches).

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
        self.directory = None if directory is None else Path(directory)
        self._tasks: dict[str, Task] = {}
        self._info: dict[str, TaskInfo] = {}
        self._accounts: dict[str, TaskAccount] = {}
        self._models: OrderedDict[str, nn.Module] = OrderedDict()
        self._reports: dict[str, CompactReport] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.directory.glob(f"*{SUFFIX}")):
                self._register(path.name[: -len(SUFFIX)], Task.load(path))

    @property
    def base(self) -> nn.Module:
        return self.builder.base

    # -- the collection -------------------------------------------------------------------------
    def add(self, name: str, task: Task | str | Path, overwrite: bool = False) -> TaskInfo:
        """Add ``task`` (a :class:`Task` or a task file) as ``name``; refuses a task trained
        on another base, and an existing name unless ``overwrite``."""
        _check_name(name)
        if name in self._tasks and not overwrite:
            raise ConfigError(f"task {name!r} is already in the bank (pass overwrite=True)")
        task = task if isinstance(task, Task) else Task.load(task)
        self.builder.check(task)
        if self.directory is not None:
            task.save(self.directory / f"{name}{SUFFIX}")
        self._drop(name)
        return self._register(name, task)

    def remove(self, name: str) -> None:
        """Forget task ``name`` (and delete its file from the bank's directory)."""
        self._get(name)
        self._drop(name)
        del self._tasks[name], self._info[name]
        if self.directory is not None:
            (self.directory / f"{name}{SUFFIX}").unlink(missing_ok=True)

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
        model, report = self.builder.build(task, verify=self.verify)
        model.eval()
        info = self._info[name]
        info.params = sum(p.numel() for p in model.parameters())
        info.density = density(report)
        self._models[name], self._reports[name] = model, report
        while len(self._models) > self.cache_size:
            self._models.popitem(last=False)
        return model

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
        self._models.pop(name, None)
        self._reports.pop(name, None)
        self._accounts.pop(name, None)

    def _get(self, name: str) -> Task:
        if name not in self._tasks:
            raise UnknownNameError("task", name, self._tasks)
        return self._tasks[name]


def _check_name(name) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"task name must be letters, digits, '_', '-' or '.', starting with a letter or "
            f"digit, got {name!r}"
        )
