"""A tiny saved composed model with tokenizer files, and a server on it in this process (uvicorn in a
thread, a free port on 127.0.0.1), for the serving tests."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import torch
import uvicorn

from llm_modules import LLMModulesModel
from llm_modules.entrypoints.openai import build_app

from .test_model import nudge


def save_tiny_composed(pair: dict[str, str], folder) -> str:
    """The tiny pair (GPT-2 tokenizer on the large side) composed, nudged off its initial weights and saved
    (the `new` head: the residual one repeats the random large model's favourite token)."""
    torch.manual_seed(0)
    model = LLMModulesModel.compose(large=pair["large"], small=pair["small"], head="new")
    nudge(model, scale=0.5)  # far enough from init that the small side changes the tokens
    model.save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """`llm_modules.entrypoints.openai.build_app(model, **options)` served by uvicorn on a thread; `url` is its base."""

    def __init__(self, model: str, **options):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(model, **options), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        wait_until_healthy(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until_healthy(url: str, timeout: float = 120.0, process=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no healthy server at {url} after {timeout} s")


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")
