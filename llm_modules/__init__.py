"""llm-modules: a frozen large causal LM feeds a small trainable one through Enhanced Cross-Attention.

Implements K. Kolomeitsev, "LLM Modules: Knowledge Transfer from a Large to a Small Model using
Enhanced Cross-Attention" (arXiv 2502.08213), causal by default and without the defects of the
paper's published code.
"""

__version__ = "0.1.0"

from .model import LLMModulesModel  # noqa: E402

__all__ = ["LLMModulesModel", "__version__"]
