"""Keep protobuf's pure-Python message module out of the agent's boot.

The guest runs protobuf's compiled backend (upb), yet `descriptor_pool`
imports `python_message` on its own import, and with it text_format,
pickle, datetime, calendar and well-known-type helpers that upb never
calls: about a tenth of the agent's imports under emulation. Importing
this module first registers `python_message` as a lazy module, loaded on
its first attribute access, which only the pure-Python backend makes.
Nothing about what the agent accepts changes: messages are parsed by upb
either way.
"""

from __future__ import annotations

import importlib.util
import sys

PYTHON_MESSAGE = "google.protobuf.internal.python_message"


def defer_python_message() -> bool:
    """Register the lazy module; False when protobuf is already imported or
    the module is not there (then nothing changes)."""
    if PYTHON_MESSAGE in sys.modules:
        return False
    spec = importlib.util.find_spec(PYTHON_MESSAGE)
    if spec is None or spec.loader is None:
        return False
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[PYTHON_MESSAGE] = module
    spec.loader.exec_module(module)
    # Bound on its package too: `from google.protobuf.internal import
    # python_message` then takes the attribute, where a lookup through the
    # import system would read the module's __spec__ and so load it.
    package, _, name = PYTHON_MESSAGE.rpartition(".")
    setattr(importlib.import_module(package), name, module)
    return True


defer_python_message()
