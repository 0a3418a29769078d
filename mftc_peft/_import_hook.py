"""Run a callback once PEFT is imported and no module of this package is half-imported.

`import mftc_peft` must register the `mftc` tuner type with PEFT (PEFT has no plugin discovery), yet the command
line's `--help`, argument errors and data-file checks should not pay seconds for PEFT, transformers and torch. So the
package finishes loading when PEFT arrives: at once if PEFT is already imported, else right after `import peft`
completes. Imports of the package's own submodules are counted too: when one of them is what imported PEFT, the
callback waits until that import is complete, since it would otherwise re-enter a half-built module.
"""

from __future__ import annotations

import sys
import warnings


class _CountingLoader:
    """Wraps a module's loader: counts the imports in flight and fires the hook when the outermost one ends."""

    def __init__(self, hook: "_WhenImported", loader):
        self._hook, self._loader = hook, loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._hook.in_flight += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._hook.in_flight -= 1
            # The wrapper was only needed during the import: resource readers etc. expect the real loader.
            module.__loader__ = module.__spec__.loader = self._loader
            # Also when the import failed: PEFT may be fully imported by then, and `import peft` will not run again.
            self._hook.fire_if_ready()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _WhenImported:
    """A `sys.meta_path` finder that finds nothing itself: it wraps the loaders of `trigger` and of `package.*`."""

    def __init__(self, trigger: str, package: str, callback):
        self.trigger, self.package, self.callback = trigger, package, callback
        self.in_flight, self.fired = 0, False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.trigger and not fullname.startswith(self.package + "."):
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CountingLoader(self, spec.loader)
                return spec
        return None

    def fire_if_ready(self) -> None:
        if self.fired or self.in_flight or self.trigger not in sys.modules:
            return
        self.fired = True
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            self.callback()
        except Exception as error:  # noqa: BLE001
            # Raised inside someone's `import peft`, it would make that import fail: warn instead. The same error
            # is raised again where the package's names are first used (`mftc_peft.__getattr__` loads them).
            warnings.warn(f"mftc_peft could not finish loading when PEFT was imported: {error!r}", ImportWarning)


def when_imported(trigger: str, package: str, callback) -> None:
    """Call `callback()` once `trigger` is in `sys.modules` and no import of a `package` submodule is in flight."""
    hook = _WhenImported(trigger, package, callback)
    if trigger in sys.modules:
        hook.fire_if_ready()
    else:
        sys.meta_path.insert(0, hook)  # first: it must wrap the loaders before another finder returns them
