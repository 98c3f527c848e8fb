# apr-numba: `make run` sets everything up and runs the main job on the default model;
# `make test` runs the tests. Both are idempotent and work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= smollm2-135m
PROMPT ?= The three primary colors are

.PHONY: install run test lint models requant clean-cache

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

# warmup compiles the Numba kernels into the cache (progress on a terminal; seconds when already warm).
install: $(STAMP)
	$(VENV)/bin/apr-numba pull $(MODEL)
	$(VENV)/bin/apr-numba warmup $(MODEL)

# On a terminal `make run` ends in the live dashboard (apr-tui: Enter generates, q quits); without one
# (CI, a pipe) it prints one generation and exits, so it never waits for keys.
run: install
	@if [ -t 0 ] && [ -t 1 ]; then \
		$(VENV)/bin/apr-tui $(MODEL) -p "$(PROMPT)"; \
	else \
		$(VENV)/bin/apr-numba run $(MODEL) -p "$(PROMPT)" --max-tokens 48; \
	fi

# The tests need the real decoder models (qwen2 ~490 MB, gemma3 ~250 MB) and the encoder.
models: $(STAMP)
	$(VENV)/bin/apr-numba pull smollm2-135m
	$(VENV)/bin/apr-numba pull qwen2.5-coder-0.5b
	$(VENV)/bin/apr-numba pull gemma3-270m
	$(VENV)/bin/apr-numba pull minilm-l6

# Requantize SmolLM2 and Qwen2.5 with llama.cpp (Q5_K_M, Q3_K_M, Q2_K, IQ4_XS; ~1.8 GB in models/, git-ignored)
# for tests/test_requant_models.py, and cut tests/fixtures/requant/quant_samples.gguf from them. Needs the
# llamacpp extra (llama-cpp-python); the committed HF references need torch (tests/fixtures/make_requant_fixtures.py).
requant: models
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install -q -e '.[llamacpp]'
	$(PY) tests/fixtures/make_requant_fixtures.py --quantize-only
	$(PY) tests/fixtures/make_quant_samples.py

test: models
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

clean-cache:
	find . -name '*.nbi' -o -name '*.nbc' | xargs rm -f
