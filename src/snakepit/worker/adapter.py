"""The Adapter base class users subclass to publish their Python tools."""

from __future__ import annotations

import importlib
from typing import Any


class Adapter:
    """One instance lives for the worker process's life.

    Override ``initialize`` to load models or open connections once (it may be async), and
    ``shutdown`` to release them when the worker exits. Tools are methods marked with ``@tool``.
    """

    worker_id: str = ""
    """The id of the worker process this instance lives in; set before ``initialize``."""

    def initialize(self) -> Any:
        """Called once before the worker reports SERVING."""
        return None

    def shutdown(self) -> Any:
        """Called once after the last call has drained."""
        return None


def load_adapter_class(spec: str) -> type[Adapter]:
    """Import ``"package.module:ClassName"`` and check it is an Adapter."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"adapter must look like 'package.module:ClassName', got {spec!r}")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, Adapter):
        raise ValueError(f"{spec!r} is not a snakepit.Adapter subclass")
    return cls
