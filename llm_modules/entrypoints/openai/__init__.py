"""Serving a model over HTTP: an OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health`) with streaming, continuous batching by `llm_modules.decoding.engine`, and a chat
page at `/`. `llm-modules serve --model DIR_OR_SPEC` runs it with uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from llm_modules.data.prompting import choose_template
from llm_modules.decoding.engine import Engine
from llm_modules.entrypoints.openai.app import Served, create_app
from llm_modules.entrypoints.openai.guard import DEFAULT_MAX_REQUEST_BYTES, is_loopback
from llm_modules.entrypoints.openai.text import PromptFormat
from llm_modules.errors import LLMModulesError
from llm_modules.models.loading import DraftOptions
from llm_modules.models.saved import RUN_MODELS

API_KEY_ENV = "LLM_MODULES_API_KEY"  # as vLLM's VLLM_API_KEY: the key without putting it on the command line


def model_id(model_spec: str) -> str:
    """The id the API reports for `model_spec`: a folder's name (a run's checkpoint: "run/best"), never
    its path; a model spec that is no folder as given."""
    path = Path(model_spec)
    if not path.is_dir():
        return model_spec
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name in RUN_MODELS and path.parent.name else path.name


def build_app(model_spec: str, max_batch: int = 8, max_queue: int = 64, max_tokens: int = 256,
              template: str | None = None, name: str | None = None, allow_large_mismatch: bool = False,
              device: Any = None, dtype: Any = None, host: str = "127.0.0.1", api_key: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, draft: DraftOptions | None = None,
              cpu_linear: str = "auto") -> Any:
    """Load a saved composed model (or run folder), a saved plain method or a plain model spec, in
    `dtype` (default float32) onto `device` (default the CPU), and wrap it in the FastAPI app; the
    engine's thread starts with the app. `host` is the address the app will listen on (Host headers
    are checked when it is a loopback one); with `api_key`, /v1/* needs `Authorization: Bearer KEY`; with
    `draft` (`models.loading.DraftOptions`: a drafter folder or prompt lookup, and how it drafts) the model decodes
    speculatively: the same tokens in fewer passes."""
    import torch

    from llm_modules.models.loading import load_model

    if max_tokens < 1:
        raise LLMModulesError(f"--max-tokens must be >= 1, got {max_tokens}")
    if max_request_bytes < 1:
        raise LLMModulesError(f"--max-request-bytes must be >= 1, got {max_request_bytes}")
    loaded = load_model(model_spec, device=device, dtype=dtype or torch.float32,
                        allow_large_mismatch=allow_large_mismatch, cpu_linear=cpu_linear)
    if draft:
        from llm_modules.models.loading import load_drafter

        loaded.drafter = load_drafter(draft, loaded, model_spec, allow_large_mismatch)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_queue=max_queue, drafter=loaded.drafter)
    prompts = PromptFormat(loaded.tokenizer, choose_template(model_spec, loaded.tokenizer, template))
    return create_app(Served(engine, name or model_id(model_spec), prompts, max_tokens, host, api_key or None,
                             max_request_bytes))


def serve(model_spec: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          **options: Any) -> None:
    """Build the app and run it with uvicorn until interrupted; the key defaults to $LLM_MODULES_API_KEY."""
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    app = build_app(model_spec, host=host, api_key=api_key, **options)
    if api_key is None and not is_loopback(host):
        print(f"warning: serving on {host} with no API key: anyone who can reach this address can use the model "
              f"(pass --api-key or set {API_KEY_ENV})", file=sys.stderr, flush=True)
    print(f"serving {model_spec} as '{app.state.served.name}' on http://{host}:{port} (chat page at /, API at /v1"
          f"{'; API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["API_KEY_ENV", "Served", "build_app", "create_app", "model_id", "serve"]
