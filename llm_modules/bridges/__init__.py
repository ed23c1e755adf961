"""Bridges from the frozen large model to the small one, by name: {name: (options dataclass, module)}.

- `eca`: the paper's Enhanced Cross-Attention; its output is the small model's input embeddings.
- `ladder`: several large layers, normed, projected and added through zero-started gates into the
  small model's residual stream at matching depths (Ladder Side-Tuning, Flamingo's gates).
- `xattn`: zero-gated causal cross-attention blocks inside the small model (Flamingo, CALM).

The composed model only calls the shared interface (`base.Bridge`); it never asks which one it has.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llm_modules.bridges.base import (
    Bridge,
    BridgeCache,
    BridgeShape,
    LargeRead,
    LargeView,
)
from llm_modules.bridges.eca import EcaBridge, EcaOptions
from llm_modules.bridges.ladder import LadderBridge, LadderOptions
from llm_modules.bridges.xattn import XattnBridge, XattnOptions
from llm_modules.errors import LLMModulesError

BRIDGES: dict[str, tuple[type, type[Bridge]]] = {
    "eca": (EcaOptions, EcaBridge),
    "ladder": (LadderOptions, LadderBridge),
    "xattn": (XattnOptions, XattnBridge),
}


def bridge_classes(name: str) -> tuple[type, type[Bridge]]:
    """(options dataclass, module class) of the bridge `name`; an unknown name is a clear error."""
    if name not in BRIDGES:
        raise LLMModulesError(f"unknown bridge {name!r}; valid bridges: {', '.join(BRIDGES)}")
    return BRIDGES[name]


def option_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(bridge_classes(name)[0])]


def bridge_options(name: str, options: dict[str, Any]) -> Any:
    """The validated options dataclass of bridge `name` from a plain dict (unknown keys: an error)."""
    options_class = bridge_classes(name)[0]
    unknown = sorted(set(options) - set(option_names(name)))
    if unknown:
        raise LLMModulesError(f"bridge {name!r} has no option(s) {unknown}; its options: {', '.join(option_names(name))}")
    return options_class(**options)


__all__ = ["BRIDGES", "Bridge", "BridgeCache", "BridgeShape", "LargeRead", "LargeView", "bridge_classes",
           "bridge_options", "option_names"]
