# apr-numba: `make run` sets everything up and runs the main job on the default model;
# `make test` runs the tests. Both are idempotent and work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= smollm2-135m
PROMPT ?= The three primary colors are

.PHONY: install run test lint models clean-cache

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

test: models
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

clean-cache:
	find . -name '*.nbi' -o -name '*.nbc' | xargs rm -f
