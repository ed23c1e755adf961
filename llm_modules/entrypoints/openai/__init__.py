"""Serving a model over HTTP: an OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health`) with streaming, continuous batching by `llm_modules.decoding.engine`, and a chat
page at `/`. `llm-modules serve --model DIR_OR_SPEC` runs it with uvicorn."""

from __future__ import annotations

from typing import Any

from llm_modules.data.prompting import choose_template
from llm_modules.decoding.engine import Engine
from llm_modules.entrypoints.openai.app import Served, create_app
from llm_modules.entrypoints.openai.text import PromptFormat
from llm_modules.errors import LLMModulesError


def build_app(model_spec: str, max_batch: int = 8, max_queue: int = 64, max_tokens: int = 256,
              template: str | None = None, name: str | None = None, allow_large_mismatch: bool = False,
              device: Any = None, dtype: Any = None) -> Any:
    """Load a saved composed model (or run folder), a saved plain method or a plain model spec, in
    `dtype` (default float32) onto `device` (default the CPU), and wrap it in the FastAPI app; the
    engine's thread starts with the app."""
    import torch

    from llm_modules.models.loading import load_model

    if max_tokens < 1:
        raise LLMModulesError(f"--max-tokens must be >= 1, got {max_tokens}")
    loaded = load_model(model_spec, device=device, dtype=dtype or torch.float32,
                        allow_large_mismatch=allow_large_mismatch)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_queue=max_queue)
    prompts = PromptFormat(loaded.tokenizer, choose_template(model_spec, loaded.tokenizer, template))
    return create_app(Served(engine, name or model_spec, prompts, max_tokens))


def serve(model_spec: str, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Build the app and run it with uvicorn until interrupted."""
    import uvicorn

    app = build_app(model_spec, **options)
    print(f"serving {model_spec} on http://{host}:{port} (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["Served", "build_app", "create_app", "serve"]
