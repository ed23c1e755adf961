"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from llm_modules.entrypoints.cli import main

from ..helpers import (
    ServerThread,
    free_port,
    save_tiny_composed,
    wait_for,
    wait_until_healthy,
)

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
MODEL_ID = "model"  # the saved folder's name: the id served by default


@pytest.fixture(scope="module")
def model_dir(tiny_pair_with_tokenizer, tmp_path_factory):
    return save_tiny_composed(tiny_pair_with_tokenizer, tmp_path_factory.mktemp("served") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(model_dir, max_batch=4, max_queue=8) as running:
        yield running


def client_for(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def cli_generate(capsys, model_dir: str, prompt: str, template: str, max_new_tokens: int) -> str:
    capsys.readouterr()
    # the server fixture's model is on the CPU in float32 (build_app's defaults); generate's own
    # defaults would pick a GPU in bfloat16 where there is one, and a tiny random model's near-ties
    # then decode other tokens
    assert main(["generate", "--model", model_dir, "--prompt", prompt, "--template", template,
                 "--max-new-tokens", str(max_new_tokens), "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")  # TextStreamer ends the stream with a newline
    return out[:-1]


def test_chat_with_the_openai_client_equals_generate_whole_and_streamed(server, model_dir, capsys):
    client = client_for(server.url)
    [model] = client.models.list().data
    assert model.id == MODEL_ID
    whole = client.chat.completions.create(model=model.id, messages=HELLO, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12 and whole.usage.prompt_tokens > 5
    # greedy: the same text as `llm-modules generate` with the same (training) template
    assert choice.message.content == cli_generate(capsys, model_dir, HELLO[0]["content"], "stratos", 12)
    assert len(set(choice.message.content.split())) > 3

    chunks = list(client.chat.completions.create(model=model.id, messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 3 and "".join(content) == choice.message.content  # streamed piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"messages": HELLO, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}


def test_completions_equal_generate_on_the_raw_prompt(server, model_dir, capsys):
    client = client_for(server.url)
    result = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert result.object == "text_completion" and result.choices[0].finish_reason == "length"
    assert result.choices[0].text == cli_generate(capsys, model_dir, "Once upon a time", "raw", 10)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert streamed == result.choices[0].text


def test_stop_strings_cut_the_text_whole_and_streamed(server, model_dir):
    client = client_for(server.url)
    free = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=24, temperature=0)
    text = free.choices[0].message.content
    stop = next(text[i : i + 3] for i in range(len(text) // 3, len(text) - 3) if text[i : i + 3].strip()
                and "\ufffd" not in text[i : i + 3])
    expected = text[: text.index(stop)]
    stopped = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=24, temperature=0,
                                             stop=[stop, "never appears"])
    assert stopped.choices[0].message.content == expected and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 24
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=24, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(server, model_dir):
    client = client_for(server.url)

    def sample(seed):
        return client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, temperature=0.9,
                                              top_p=0.95, seed=seed).choices[0].message.content

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def post(url: str, body, path: str = "/v1/chat/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("body,status,param,words", [
    (b'{"messages": [{"role": "user", "content": "hi"}', 400, None, ["malformed JSON"]),
    ({"messages": HELLO, "max_tokens": 4, "frequency_penalty": 1}, 400, "frequency_penalty",
     ["unknown field 'frequency_penalty'"]),
    ({"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, 400, "messages.0.mood", ["unknown field"]),
    ({"messages": HELLO, "max_tokens": "4"}, 400, "max_tokens", ["max_tokens", "integer"]),
    ({"messages": HELLO, "temperature": 3}, 400, "temperature", ["temperature"]),
    ({"messages": []}, 400, "messages", ["at least one message"]),
    ({"max_tokens": 4}, 400, "messages", ["missing required field 'messages'"]),
    ([1, 2], 400, None, ["JSON object"]),
    ({"messages": HELLO, "max_tokens": 5000}, 400, "max_tokens", ["max_tokens=5000", "1024 positions", "at most"]),
    ({"messages": HELLO, "max_completion_tokens": 5000}, 400, "max_completion_tokens", ["1024 positions"]),
    ({"prompt": " x" * 1100}, 400, "prompt", ["fills the 1024 positions"]),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", ["expected a 'user' message"]),
    ({"messages": HELLO, "model": "gpt-4"}, 404, "model", ["'gpt-4' is not served"]),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, body, status, param, words):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    response = post(server.url, body, path)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert all(w in error["message"] for w in words), error["message"]
    ok = post(server.url, {"messages": HELLO, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def first_content_line(lines) -> str:
    return next(line for line in lines if line.startswith("data: ") and '"content"' in line and '""' not in line)


@pytest.fixture(scope="module")
def long_model_dir(tiny_pair_with_tokenizer, tmp_path_factory):
    """The tiny pair with both models placing 100,000 positions: requests that outlast the test."""
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        LlamaForCausalLM,
        Qwen2ForCausalLM,
    )

    root = tmp_path_factory.mktemp("long")
    torch.manual_seed(1)
    for side, family in (("small", LlamaForCausalLM), ("large", Qwen2ForCausalLM)):
        config = AutoConfig.from_pretrained(tiny_pair_with_tokenizer[side])
        config.max_position_embeddings = 100_000
        family(config).save_pretrained(root / side)
    AutoTokenizer.from_pretrained(tiny_pair_with_tokenizer["large"]).save_pretrained(root / "large")
    return save_tiny_composed({"large": str(root / "large"), "small": str(root / "small")}, root / "model")


def test_a_full_queue_gets_429_and_a_client_that_leaves_frees_its_row(long_model_dir):
    long_request = {"messages": HELLO, "max_tokens": 90_000, "temperature": 0, "stream": True}
    with ServerThread(long_model_dir, max_batch=1, max_queue=1) as server, httpx.Client(timeout=60) as a, \
            httpx.Client(timeout=60) as b:
        with a.stream("POST", server.url + "/v1/chat/completions", json=long_request) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            first_content_line(lines)  # decoding: it holds the one place in the batch
            with b.stream("POST", server.url + "/v1/chat/completions", json=long_request):
                wait_for(lambda: health(server.url)["queued"] == 1, what="the second request to wait")
                refused = post(server.url, {"messages": HELLO, "max_tokens": 2})
                assert refused.status_code == 429
                assert refused.json()["error"]["code"] == "queue_full" and "busy" in refused.json()["error"]["message"]
                first.close()  # the first client goes away: its row is freed and the waiting one decodes
                wait_for(lambda: health(server.url)["queued"] == 0 and health(server.url)["running"] == 1,
                         what="the waiting request to take the freed row")
        wait_for(lambda: health(server.url)["running"] == 0, what="the second row to be freed")
        state = health(server.url)
        assert state["finished"] == 2 and state["generated_tokens"] < 2 * 90_000  # both left early
        ok = post(server.url, {"messages": HELLO, "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_concurrent_requests_decode_together_and_each_equals_its_answer_alone(server, model_dir):
    from concurrent.futures import ThreadPoolExecutor

    client = client_for(server.url)
    questions = ["Hi", "What is two plus two, and why is it four?", "Tell me a story about a cat", "Why?"]

    def ask(question):
        messages = [{"role": "user", "content": question}]
        return client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10 + len(question) % 7,
                                              temperature=0).choices[0].message.content

    alone = [ask(q) for q in questions]
    before = health(server.url)["generated_tokens"]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    assert health(server.url)["generated_tokens"] - before == sum(10 + len(q) % 7 for q in questions)
    # float32: padding reorders sums, which could flip a near-tie; on this model it does not
    assert together == alone


@pytest.mark.subprocess
def test_the_serve_command_starts_a_server_on_a_saved_model(model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p)}
    process = subprocess.Popen([sys.executable, "-m", "llm_modules.entrypoints.cli", "serve", "--model", model_dir, "--port",
                                str(port), "--max-batch", "2", "--api-key", "cli-key", "--max-request-bytes", "4096"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process=process)
        assert health(url)["max_batch"] == 2 and health(url)["auth"] is True
        client = OpenAI(base_url=url + "/v1", api_key="cli-key", max_retries=0, timeout=60)
        result = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=3, temperature=0)
        assert result.usage.completion_tokens == 3
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        assert httpx.post(url + "/v1/chat/completions", json=big, headers={"Authorization": "Bearer cli-key"},
                          timeout=10).status_code == 413
        assert "<html" in httpx.get(url + "/", timeout=10).text
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert f"as '{MODEL_ID}' on http://127.0.0.1:{port}" in out and "API key required" in out, (out, err)
    assert model_dir not in out.split(" as ")[1]


def test_serve_refuses_a_bad_batch_size_in_one_line(capsys):
    assert main(["serve", "--model", "unused", "--max-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-batch must be >= 1 and --max-queue >= 0, got 0 and 64"


def test_a_client_that_stops_waiting_for_a_whole_response_frees_its_row(long_model_dir):
    with ServerThread(long_model_dir, max_batch=2, max_queue=0) as server:
        with pytest.raises(httpx.ReadTimeout):
            post_with_timeout = httpx.post(server.url + "/v1/chat/completions", timeout=1.0,
                                           json={"messages": HELLO, "max_tokens": 90_000, "temperature": 0})
            pytest.fail(f"the request should outlast the client, got {post_with_timeout.status_code}")
        wait_for(lambda: health(server.url)["running"] == 0, timeout=10, what="the abandoned row to be freed")
        assert health(server.url)["finished"] == 1


def test_a_plain_model_spec_is_served_and_decodes_as_transformers_does(tiny_pair_with_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = tiny_pair_with_tokenizer["large"]  # a plain causal LM folder with tokenizer files (a baseline)
    with ServerThread(spec) as server:
        result = client_for(server.url).completions.create(model=Path(spec).name, prompt="Once upon a time", max_tokens=8,
                                                           temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(spec)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(spec).eval()
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert result.choices[0].text == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert result.usage.completion_tokens == 8


class PieceTokenizer:
    """Token i decodes as PIECES[i]."""

    PIECES = ["Hel", "lo", " wo", "rld", "\ufffd", "!"]

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(self.PIECES[t] for t in tokens)


def test_streamed_text_holds_back_what_could_start_a_stop_string_or_a_character():
    from llm_modules.entrypoints.openai.text import TextDeltas

    deltas = TextDeltas(PieceTokenizer(), ["lo wo"])
    assert deltas.update([0], final=False) == "He"  # "l" may start "lo wo"
    assert deltas.update([0, 1], final=False) == "l"  # "lo" may too
    assert deltas.update([0, 1, 2], final=False) == "" and deltas.stopped and deltas.sent == "Hel"
    plain = TextDeltas(PieceTokenizer(), [])
    pieces = [plain.update([0, 1, 2, 3, 4][:n], final=False) for n in range(1, 6)]
    assert pieces == ["Hel", "lo", " wo", "rld", ""]  # a partial character waits for its next token
    assert plain.update([0, 1, 2, 3, 4, 5], final=True) == "\ufffd!" and not plain.stopped


def test_the_served_model_loads_in_the_asked_dtype_and_a_missing_device_is_one_line(model_dir, capsys):
    from llm_modules.entrypoints.openai import build_app

    app = build_app(model_dir, dtype=torch.bfloat16, device="cpu")
    engine = app.state.served.engine
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert main(["serve", "--model", model_dir, "--device", "cuda:3"]) == 2
    assert "--device cuda:3" in capsys.readouterr().err
