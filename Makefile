# One-command set-up: every target creates .venv when absent and installs certonnx into it.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck check bench clean lock test-oldest

$(BIN)/python:
	$(PY) -m venv $(VENV)

# pyproject.toml declares ranges; constraints.txt pins the exact, tested set
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q tests

lint: $(STAMP)
	$(BIN)/ruff check certonnx tests tools examples

# mypy reads its settings (files, strictness, untyped libraries) from pyproject.toml
typecheck: $(STAMP)
	$(BIN)/mypy

# what CI runs: lint, types, then the test suite
check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python tools/bench/bounds.py

lock: $(STAMP)
	{ echo "# Exact versions for reproducible set-up and CI (make venv / make test use them with pip -c)."; \
	  echo "# pyproject.toml declares the supported ranges; regenerate with: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^certonnx'; } > constraints.txt

# optional, not part of CI (a second torch, several GB): the oldest torch pyproject.toml admits,
# with a plain (non-editable) install; AUTO_LIRPA=<path or git URL> also installs auto_LiRPA there
# (it needs torch < 2.9), so that the --backend auto_lirpa / --cross-check tests run
OLDEST := .venv-oldest
OLDEST_TORCH ?= torch==2.8.0 torchvision==0.23.0
test-oldest:
	test -x $(OLDEST)/bin/python || $(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q $(OLDEST_TORCH)
	$(OLDEST)/bin/pip install -q '.[dev]'
	if [ -n "$(AUTO_LIRPA)" ]; then $(OLDEST)/bin/pip install -q --no-deps "$(AUTO_LIRPA)" && \
	  $(OLDEST)/bin/pip install -q packaging appdirs pyyaml tqdm graphviz; fi
	$(OLDEST)/bin/python -m pytest -n 2 -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info
