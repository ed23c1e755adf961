"""llm-modules: a frozen large causal LM feeds a small trainable one through Enhanced Cross-Attention.

Implements K. Kolomeitsev, "LLM Modules: Knowledge Transfer from a Large to a Small Model using
Enhanced Cross-Attention" (arXiv 2502.08213), causal by default and without the defects of the
paper's published code.

The sub-packages follow the pipeline, and imports point down this list only (a test checks it):
entrypoints -> training -> evaluation -> states -> data -> models -> decoding -> bridges -> the
leaf modules (errors, version, devices, tensors).
"""

from llm_modules.models.composed import LLMModulesModel
from llm_modules.version import __version__

__all__ = ["LLMModulesModel", "__version__"]
