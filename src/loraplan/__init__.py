"""loraplan: which modules to target and what rank to use for LoRA, for your model and your data.

The Python API mirrors the CLI; every name loads its module on first use, so `import loraplan`
stays instant and never imports torch until a function needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "inspect": ("model.inspect", "inspect"),
    "count": ("plan.count", "count"),
    "memory": ("plan.memory", "memory"),
    "estimate_memory": ("plan.memory", "estimate_memory"),
    "load_data": ("data.load", "load_data"),
    "analyze": ("adapter.analyze", "analyze"),
    "compress": ("adapter.compress", "compress"),
    "diagnose": ("diagnosis", "diagnose"),
    "merge": ("adapter.merge", "merge"),
    "recommend": ("plan.recommend", "recommend"),
    "sweep": ("sweeps.runner", "sweep"),
    "probe": ("probing.probe", "probe"),
    "planted_task": ("sweeps.planted", "make_planted_task"),
    "report": ("sweeps.report", "report"),
    "read_sweep": ("sweeps.folder", "read_sweep"),
    "Sweep": ("sweeps.folder", "Sweep"),
    "TrialResult": ("sweeps.folder", "TrialResult"),
    "TrialStatus": ("sweeps.folder", "TrialStatus"),
    "resolve_targets": ("model.targets", "resolve_targets"),
    "load_structure": ("model.loading", "load_structure"),
    "LoraPlan": ("plan.lora_plan", "LoraPlan"),
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
