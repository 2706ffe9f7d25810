# The README's two quick-start commands: `make study` and `make test`.
# Both bootstrap .venv first (idempotent), so either works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch build on this machine's disk; installed first so no resolver pulls another one.
TORCH := torch==2.14.1 torchvision==0.29.1
TRIALS ?= 40

.PHONY: venv study test bench clean

$(BIN)/mnist-tune: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/mnist-tune

study: venv
	$(BIN)/mnist-tune study --model mlp --trials $(TRIALS)

# tests/test_browser.py drives the MLflow UI with playwright (a dev extra) and the system's
# Chromium (playwright cannot download its own browser here; .ci/run installs the Debian
# package). Without it the browser tests are skipped with the reason.
test: venv
	@test -x /usr/bin/chromium || echo "note: no /usr/bin/chromium (apt-get install -y chromium): browser tests will be skipped"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: venv
	$(BIN)/python benchmarks/epoch_time.py

clean:
	rm -rf $(VENV) *.egg-info
