"""Typed name registries for plug-ins (tasks, drafters, refresh policies).

    TASKS = Registry[Task]("task")

    @TASKS.register("arith")
    class Arithmetic(Task): ...

    TASKS.get("arith")        # the class
    TASKS.get("arithm")       # KeyError: unknown task 'arithm'; known: arith, countdown, gsm8k

A name can be registered once; a second registration of the same name is an error. On first
lookup the registry discovers its plug-ins: every module of its plug-in package (`drafters`,
`schedulers`, `codraft.tasks`; found with pkgutil, so a new module needs no import line anywhere)
and a fixed list of modules (`plugin_modules`, the rollout backends). The core never imports a
particular plug-in module itself.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, plugin_package: str | None = None, plugin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self.plugin_package = plugin_package
        self.plugin_modules = tuple(plugin_modules)  # modules (by name) that register themselves when imported
        self._items: dict[str, type[T]] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._items[name].__module__})")
            self._items[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorate

    def _load_plugins(self) -> None:
        """Import every plug-in module once (each registers itself when imported)."""
        if self._discovered:
            return
        self._discovered = True
        if self.plugin_package:
            package = importlib.import_module(self.plugin_package)
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.plugin_package}.{info.name}")
        for module in self.plugin_modules:
            importlib.import_module(module)

    def get(self, name: str) -> type[T]:
        self._load_plugins()
        if name not in self._items:
            near = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._items
