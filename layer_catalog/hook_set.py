"""The one attach / detach lifecycle of the pack's hooks: what a run puts on modules, it takes off again.

    hooks = HookSet()
    hooks.forward_hook(module, fn)                  # torch forward hook (kwargs as register_forward_hook's)
    hooks.forward_pre_hook(module, fn, with_kwargs=True)
    hooks.remove()                                  # every one of them, newest first; safe to call again

`AttachedHooks` is the base of the context managers that hook a model for one `with` block (FeatureCapture,
FeatureInjection, InterruptChecks): a subclass says what to attach in `_attach(hooks)`; the
base removes all of it when the block ends, however it ends (an exception, KeyboardInterrupt, an early exit), and
when attaching itself fails half-way. Only what was registered through the set is removed: hooks of
other code on the same modules stay as they are.
"""
from __future__ import annotations

from typing import Callable

import torch


class HookSet:
    """The handles of the hooks one run registered, to undo all at once."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []  # newest last; undone newest first

    def __len__(self) -> int:
        return len(self._undo)

    def forward_hook(self, module: torch.nn.Module, hook: Callable, **kwargs):
        handle = module.register_forward_hook(hook, **kwargs)
        self._undo.append(handle.remove)
        return handle

    def forward_pre_hook(self, module: torch.nn.Module, hook: Callable, **kwargs):
        handle = module.register_forward_pre_hook(hook, **kwargs)
        self._undo.append(handle.remove)
        return handle

    def remove(self) -> None:
        """Undo everything, newest first. If one undo fails the rest still run; the first error is raised after."""
        error = None
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except BaseException as exc:  # noqa: BLE001 - the others must still come off; re-raised below
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class AttachedHooks:
    """A context manager whose hooks exist only while its `with` block runs. Subclasses implement `_attach(hooks)`
    (register through the given HookSet) and may implement `_detached()` (forget per-run state; runs after the
    hooks are off, also when attaching failed). One instance is attached once at a time."""

    _hooks: HookSet | None = None

    @property
    def attached(self) -> bool:
        return self._hooks is not None

    def _attach(self, hooks: HookSet) -> None:
        raise NotImplementedError

    def _detached(self) -> None:
        pass

    def __enter__(self):
        if self._hooks is not None:
            raise RuntimeError(f"this {type(self).__name__} is already attached")
        self._hooks = HookSet()
        try:
            self._attach(self._hooks)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        hooks, self._hooks = self._hooks, None
        try:
            if hooks is not None:
                hooks.remove()
        finally:
            self._detached()


def module_lookup(root: torch.nn.Module, owner: str = "model") -> Callable[[str], torch.nn.Module]:
    """`lookup(path)` -> the submodule of `root` at a dotted path, or KeyError naming the path."""
    modules = dict(root.named_modules())

    def lookup(path: str) -> torch.nn.Module:
        if path not in modules:
            raise KeyError(f"the {owner} has no module {path!r}")
        return modules[path]
    return lookup
