"""loraplan: which modules to target and what rank to use for LoRA, for your model and your data.

The Python API mirrors the CLI; every name loads its module on first use, so `import loraplan`
stays instant and never imports torch until a function needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "inspect": ("inspection", "inspect"),
    "count": ("counting", "count"),
    "memory": ("gpu_memory", "memory"),
    "estimate_memory": ("gpu_memory", "estimate_memory"),
    "load_data": ("data", "load_data"),
    "analyze": ("analysis", "analyze"),
    "compress": ("compression", "compress"),
    "diagnose": ("diagnosis", "diagnose"),
    "merge": ("merging", "merge"),
    "recommend": ("recommendation", "recommend"),
    "sweep": ("ablation.runner", "sweep"),
    "probe": ("probing", "probe"),
    "planted_task": ("planted", "make_planted_task"),
    "report": ("reporting", "report"),
    "resolve_targets": ("targets", "resolve_targets"),
    "load_structure": ("sources", "load_structure"),
    "LoraPlan": ("plan", "LoraPlan"),
    "UsageError": ("errors", "UsageError"),
    "RunError": ("errors", "RunError"),
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loraplan' has no attribute '{name}'")
