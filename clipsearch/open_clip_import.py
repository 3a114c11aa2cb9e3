"""Importing open_clip without the parts of its dependencies that clipsearch never uses, chiefly torch._dynamo.

`import open_clip` pulled in torch._dynamo (and torch._inductor with it) twice over: through timm, whose models
decorate methods with `torch.compiler.disable`, and through torchvision, whose `ops.roi_align` imports a function from
`torch._dynamo.utils` that it calls only when roi_align runs. On the 2-core Zen 4 that was 1.2-1.6 s of the import
(4.2-4.6 s against 2.8-3.0 s) and 170 MB of resident memory, 250 MB at the peak of an indexing run (1381 against
1128 MB), in every process that embeds anything.

So, on the first import only:
- timm is held absent. open_clip treats it as optional (its timm adapter catches the ImportError), and the adapter's
  model class is given it back on first use: building a timm vision tower, through clipsearch or through open_clip
  directly, first re-runs the adapter's own `import timm`.
- `torch._dynamo.utils` is held by a stand-in: its function imports the real module when first called, and any other
  name asked of it imports the real module at once.
Nothing behaves differently; each import happens if and when something needs it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import threading
import types
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

_DYNAMO_UTILS = "torch._dynamo.utils"
_LAZY_NAMES = ("is_compile_supported",)  # what torchvision takes from it at import time
_TIMM_ADAPTER = "open_clip.timm_model"
_lock = threading.RLock()


def import_open_clip() -> types.ModuleType:
    """`import open_clip`, leaving timm and torch._dynamo unimported until a model or a caller needs them."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    with _lock:
        import torch  # noqa: F401 - the stand-in's parent package must be the real one

        timm_held = "timm" not in sys.modules
        try:
            with ExitStack() as deferred:
                if "torch._dynamo" not in sys.modules and _DYNAMO_UTILS not in sys.modules:
                    deferred.enter_context(stand_in(_DYNAMO_UTILS, _LAZY_NAMES))
                if timm_held:
                    deferred.enter_context(_absent("timm"))
                import open_clip
        except ImportError:  # a version that cannot do without them at import time: as it comes
            import open_clip

        if timm_held:
            _timm_on_first_use(sys.modules.get(_TIMM_ADAPTER))
    return open_clip


def _timm_on_first_use(adapter: types.ModuleType | None) -> None:
    """Make the adapter's model class re-run the adapter's `import timm` (now allowed) before it first builds one."""
    model = getattr(adapter, "TimmModel", None)
    if adapter is None or model is None or getattr(adapter, "timm", False) is not None:
        return  # laid out otherwise, or it found timm anyway: nothing to hand back
    original = model.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with _lock:
            if adapter.timm is None and importlib.util.find_spec("timm") is not None:
                importlib.reload(adapter)  # into the same namespace this class's methods read
        original(self, *args, **kwargs)

    model.__init__ = __init__


@contextmanager
def _absent(name: str) -> Iterator[None]:
    """``import name`` raises ImportError meanwhile, as if it were not installed."""
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


class stand_in:  # noqa: N801 - a context manager, named like contextlib's
    """Hold ``name`` in sys.modules with a module whose ``lazy`` functions import the real one on their first call."""

    def __init__(self, name: str, lazy: tuple[str, ...]) -> None:
        self.name = name
        self.module = types.ModuleType(name, f"stand-in for {name}, imported on first use (clipsearch)")
        self.module.__getattr__ = self._now  # type: ignore[attr-defined] - PEP 562: any name not set below
        for attribute in lazy:
            setattr(self.module, attribute, self._forwarder(attribute))

    def __enter__(self) -> types.ModuleType:
        sys.modules[self.name] = self.module
        return self.module

    def __exit__(self, *exc: object) -> None:
        if sys.modules.get(self.name) is self.module:
            del sys.modules[self.name]

    def real(self) -> types.ModuleType:
        if sys.modules.get(self.name) is self.module:
            del sys.modules[self.name]
        return importlib.import_module(self.name)

    def _now(self, attribute: str) -> Any:
        if attribute.startswith("__"):  # the import system probes __path__ and the like: not a use
            raise AttributeError(attribute)
        return getattr(self.real(), attribute)

    def _forwarder(self, attribute: str) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return getattr(self.real(), attribute)(*args, **kwargs)

        forward.__name__ = forward.__qualname__ = attribute
        return forward
