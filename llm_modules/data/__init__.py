"""Data: record sources (files, generators, hub datasets), rendering with prompt templates, the
train/validation split, tokenization and collation, and answer extraction for scoring."""


def __getattr__(name: str):
    # `llm_modules.data` was one module before the sub-packages; its names live in `data.prepare` now
    import importlib
    import warnings

    prepare = importlib.import_module("llm_modules.data.prepare")
    if name.startswith("__") or not hasattr(prepare, name):
        raise AttributeError(f"module 'llm_modules.data' has no attribute {name!r}")
    warnings.warn(f"llm_modules.data.{name} moved to llm_modules.data.prepare.{name}; the old path goes in the "
                  "next release", DeprecationWarning, stacklevel=2)
    return getattr(prepare, name)
