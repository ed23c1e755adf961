"""The server's limits: one bad request never fails another, an API key, the Host header, bounded
requests, OpenAI-style errors for every refusal (never an exception's text), failures visible in
/health and the log, and the model's id. Issue 28, items 1 to 8."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from ..helpers import ServerThread, save_tiny_composed

KEY = "sk-test-0123456789"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
MODEL_ID = "model"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tiny_pair_with_tokenizer, tmp_path_factory):
    return save_tiny_composed(tiny_pair_with_tokenizer, tmp_path_factory.mktemp("limits") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(model_dir, max_batch=4, max_queue=8, api_key=KEY, max_request_bytes=64_000) as running:
        yield running


def served(server):
    return server.server.config.app.state.served


def post(url: str, body, path: str = "/v1/chat/completions", headers=None, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) or not isinstance(body, (dict, list)) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json", **AUTH, **(headers or {})}, **kwargs)


def assert_error(response: httpx.Response, status: int, param=None, code=None, words=()) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code, error
    assert all(w in error["message"] for w in words), error["message"]
    return error


def still_serving(url: str) -> None:
    ok = post(url, {"messages": HELLO, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


# ------------------------------------------------------------------- 1: one bad request, one failure
def test_a_temperature_that_overflows_is_a_400_and_its_neighbour_decodes_on(server):
    with httpx.Client(timeout=60, headers=AUTH) as client:
        body = {"messages": HELLO, "max_tokens": 40, "temperature": 0, "stream": True}
        with client.stream("POST", server.url + "/v1/chat/completions", json=body) as neighbour:
            lines = neighbour.iter_lines()
            next(line for line in lines if '"content"' in line)  # decoding
            for temperature in (1e-300, 0.001):
                error = assert_error(post(server.url, {"messages": HELLO, "temperature": temperature}), 400,
                                     "temperature")
                assert "at least 0.01" in error["message"]
            events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_a_repetition_penalty_that_overflows_is_a_400_and_a_sane_one_applies(server, monkeypatch):
    """Issue 35, defect 8: vLLM's repetition_penalty, bounded as the command line's; a good one reaches the
    engine's options (the request decodes with it)."""
    for value in (1e-40, 0, 1e40):
        error = assert_error(post(server.url, {"messages": HELLO, "repetition_penalty": value, "temperature": 1}),
                             400, "repetition_penalty")
        assert "between 0.01 and 100" in error["message"]
    engine, seen = served(server).engine, []
    real = engine.sequence
    monkeypatch.setattr(engine, "sequence", lambda prompt, options, **kw: seen.append(options) or real(prompt, options,
                                                                                                      **kw))
    ok = post(server.url, {"messages": HELLO, "max_tokens": 3, "repetition_penalty": 1.3, "temperature": 1, "seed": 1})
    assert ok.status_code == 200 and seen[0].repetition_penalty == 1.3 and seen[0].do_sample
    still_serving(server.url)


# ------------------------------------------------------------------- 2: the context limit, both models
@pytest.fixture(scope="module")
def short_large_dir(tiny_pair_with_tokenizer, tmp_path_factory):
    """A large model with 300 learned positions (GPT-2) and a small one that places 1,024."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("short_large")
    torch.manual_seed(2)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=300, vocab_size=50257)).save_pretrained(
        root / "large")
    AutoTokenizer.from_pretrained(tiny_pair_with_tokenizer["large"]).save_pretrained(root / "large")
    return save_tiny_composed({"large": str(root / "large"), "small": tiny_pair_with_tokenizer["small"]},
                              root / "model")


def test_the_large_models_position_limit_is_checked_before_decoding(short_large_dir):
    with ServerThread(short_large_dir, max_batch=4) as server:
        def ask(body, path="/v1/completions"):
            return httpx.post(server.url + path, json=body, timeout=60)

        assert_error(ask({"prompt": " x" * 400}), 400, "prompt", words=["fills the 300 positions"])
        assert_error(ask({"prompt": " x" * 250, "max_tokens": 100}), 400, "max_tokens",
                     words=["300 positions", "at most 50"])
        reply = ask({"prompt": " x" * 250, "max_tokens": 50, "temperature": 0})  # up to the last position
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 50
        assert health(server.url)["failed"] == 0


# ------------------------------------------------------------------- 3: API key, Host header
def test_an_api_key_guards_v1_but_not_health_or_the_page(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(server.url + "/v1/models", headers=headers, timeout=10)
        assert_error(response, 401, code="invalid_api_key", words=["API key"])
        assert response.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=10), 401,
                 code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    assert health(server.url)["auth"] is True and "<html" in httpx.get(server.url + "/", timeout=10).text


def test_a_host_header_other_than_the_loopback_address_is_refused(server):
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"attacker.test:{port}"):
        for path in ("/", "/health", "/v1/models"):
            response = httpx.get(server.url + path, headers={"Host": host, **AUTH}, timeout=10)
            assert_error(response, 400, code="invalid_host", words=["Host header"])
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert httpx.get(server.url + "/v1/models", headers={"Host": host, **AUTH}, timeout=10).status_code == 200


def test_serving_beyond_loopback_without_a_key_warns_and_the_key_may_come_from_the_environment(model_dir, monkeypatch,
                                                                                               capsys):
    import uvicorn

    from llm_modules.entrypoints.openai import serve

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append((app, options)))
    monkeypatch.delenv("LLM_MODULES_API_KEY", raising=False)
    serve(model_dir, host="0.0.0.0", port=8123)
    assert "warning: serving on 0.0.0.0 with no API key" in capsys.readouterr().err
    assert apps[-1][1]["host"] == "0.0.0.0" and apps[-1][0].state.served.api_key is None
    monkeypatch.setenv("LLM_MODULES_API_KEY", "from-env")
    serve(model_dir, host="0.0.0.0", port=8123)
    out = capsys.readouterr()
    assert "warning" not in out.err and "API key required" in out.out
    assert apps[-1][0].state.served.api_key == "from-env"
    serve(model_dir, host="127.0.0.1", port=8123, api_key=None)  # loopback: no warning without a key...
    assert apps[-1][0].state.served.api_key == "from-env"  # ...and the environment's key all the same


# ------------------------------------------------------------------- 4: bounded requests, off the loop
def test_a_body_over_max_request_bytes_is_413_declared_or_streamed(server):
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_error(post(server.url, big), 413, code="request_too_large", words=["64000 bytes"])

    def chunks():  # no Content-Length: refused while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    assert_error(post(server.url, chunks()), 413, code="request_too_large")
    still_serving(server.url)


@pytest.mark.parametrize("stop,words", [
    (["a", "b", "c", "d", "e"], ["at most 4 stop strings, got 5"]),
    ("x" * 257, ["at most 256 characters"]),
    (["ok", "y" * 300], ["at most 256 characters"]),
])
def test_stop_strings_are_bounded_in_number_and_length(server, stop, words):
    error = assert_error(post(server.url, {"messages": HELLO, "stop": stop}), 400, "stop", words=words)
    assert len(error["message"]) < 200  # the strings are not echoed back


def test_prompts_render_off_the_event_loop(server, monkeypatch):
    prompts = served(server).prompts

    rendering, release = threading.Event(), threading.Event()

    class Slow:
        template = prompts.template

        def chat(self, messages):  # a long conversation's render: it ends only when the test says so
            rendering.set()
            release.wait(60)
            return prompts.chat(messages)

    monkeypatch.setattr(served(server), "prompts", Slow())
    replies = []
    worker = threading.Thread(target=lambda: replies.append(post(server.url, {"messages": HELLO, "max_tokens": 2})))
    worker.start()
    try:
        assert rendering.wait(30)
        # answered while the render is still held: on the event loop, it would hold /health until released
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200 and not release.is_set()
    finally:
        release.set()
        worker.join(timeout=60)
    assert replies[0].status_code == 200


def test_a_chat_template_renders_twice_however_many_turns():
    from llm_modules.data.prepare import render
    from llm_modules.data.sources import Record
    from llm_modules.entrypoints.openai.text import PromptFormat

    from ..helpers import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    renders = []
    original = tokenizer.apply_chat_template
    tokenizer.apply_chat_template = lambda *a, **k: renders.append(1) or original(*a, **k)
    turns = [("system", "Be brief.")] + [("user" if i % 2 == 0 else "assistant", f"turn {i}: 4" if i % 2 else "2+2?")
                                         for i in range(41)]
    ids = PromptFormat(tokenizer, "chat").chat(turns)
    assert len(renders) == 2
    # the same ids as training's renderer, which renders the template once per assistant turn
    messages = [{"role": r, "content": t} for r, t in turns[1:]] + [{"role": "assistant", "content": "x"}]
    full, labels = render(Record(system="Be brief.", messages=messages), tokenizer, "chat")
    assert len(renders) == 2 + 1 + 21
    start = max(i for i, label in enumerate(labels) if label != -100)
    while labels[start - 1] != -100:
        start -= 1
    assert ids == full[:start]


def test_more_messages_than_positions_are_refused_before_rendering(server, monkeypatch):
    limit = served(server).engine.max_positions
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(limit + 1)]
    assert_error(post(server.url, {"messages": messages}), 400, "messages", words=[f"{limit} positions"])


# ------------------------------------------------------------------- 5: OpenAI-style errors, never a trace
@pytest.mark.parametrize("raw,path,param", [
    (b'{"messages": [{"role": "user", "content": "h\\ud800"}]}', "/v1/chat/completions", "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff!"}]}]}', "/v1/chat/completions",
     "messages.0.content.0.text"),
    (b'{"prompt": "abc\\ud83d"}', "/v1/completions", "prompt"),
    (b'{"prompt": "abc", "stop": ["ok", "\\ud800"]}', "/v1/completions", "stop.1"),
])
def test_a_lone_surrogate_is_a_400(server, raw, path, param):
    assert_error(post(server.url, raw, path), 400, param, words=["lone surrogate"])
    still_serving(server.url)


@pytest.mark.parametrize("seed,status", [(2**64, 400), (-2**63 - 1, 400), (10**30, 400), (2**64 - 1, 200),
                                         (-2**63, 200)])
def test_a_seed_beyond_64_bits_is_a_400(server, seed, status):
    body = {"messages": HELLO, "max_tokens": 2, "temperature": 0.5, "seed": seed}
    response = post(server.url, body)
    if status == 400:
        assert_error(response, 400, "seed", words=["seed"])
    else:
        assert response.status_code == 200, response.text


def test_an_unexpected_failure_is_an_openai_500_without_its_text_and_goes_to_the_log(server, monkeypatch, caplog):
    prompts = served(server).prompts

    class Broken:
        template = prompts.template
        chat = prompts.chat

        def completion(self, prompt):
            raise RuntimeError("boom in /very/secret/path/module.py")

    monkeypatch.setattr(served(server), "prompts", Broken())
    with caplog.at_level("ERROR"):
        response = post(server.url, {"prompt": "hi"}, "/v1/completions")
    error = response.json()["error"]
    assert response.status_code == 500 and error["type"] == "server_error", response.text
    assert "boom" not in response.text and "secret" not in response.text and "Traceback" not in response.text
    assert any("boom in /very/secret" in r.getMessage() or "boom in /very/secret" in (r.exc_text or "")
               for r in caplog.records)


# ------------------------------------------------------------------- 6: failures counted and logged
def test_a_row_that_fails_in_the_engine_is_a_500_without_details_counted_in_health(server, monkeypatch, caplog):
    engine = served(server).engine
    sequence = engine.sequence

    def failing(*args, **kwargs):
        seq = sequence(*args, **kwargs)
        seq.processors.append(lambda ids, scores: 1 / 0)  # this row's own computation fails
        return seq

    before = health(server.url)["failed"]
    monkeypatch.setattr(engine, "sequence", failing)
    with caplog.at_level("ERROR", logger="llm_modules.decoding.engine"):
        response = post(server.url, {"messages": HELLO, "max_tokens": 3, "temperature": 0})
        streamed = post(server.url, {"messages": HELLO, "max_tokens": 3, "temperature": 0, "stream": True})
    monkeypatch.undo()
    error = response.json()["error"]
    assert response.status_code == 500 and error["type"] == "server_error"
    assert "ZeroDivisionError" not in response.text and "division" not in response.text
    request_id = error["message"].split("request ")[1].split(";")[0]
    assert request_id.startswith("chatcmpl-")
    assert '"server_error"' in streamed.text and "division" not in streamed.text
    assert health(server.url)["failed"] == before + 2
    logged = [r.getMessage() for r in caplog.records if r.name == "llm_modules.decoding.engine"]
    assert len(logged) == 2 and request_id in logged[0] and "ZeroDivisionError" in logged[0]
    still_serving(server.url)


# ------------------------------------------------------------------- 8: the model's id
def test_the_default_model_id_is_the_folder_name_not_its_path(server, model_dir):
    assert httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"] == MODEL_ID
    error = assert_error(post(server.url, {"messages": HELLO, "model": "gpt-4"}), 404, "model", "model_not_found")
    assert model_dir not in error["message"] and f"'{MODEL_ID}'" in error["message"]


def test_a_run_folders_checkpoint_is_named_with_its_run(tmp_path):
    from llm_modules.entrypoints.openai import model_id

    (tmp_path / "runs" / "demo" / "best").mkdir(parents=True)
    assert model_id(str(tmp_path / "runs" / "demo" / "best")) == "demo/best"
    assert model_id(str(tmp_path / "runs" / "demo") + "/") == "demo"
    assert model_id("qwen2.5-coder-0.5b-instruct") == "qwen2.5-coder-0.5b-instruct"  # a spec, not a folder

