# Two entry points: `make report` runs the main job under the cpu profile,
# `make test` runs every test. Both create or refresh the virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.t2sql-installed
PROFILE ?= cpu
OUT ?= reports/latest

.PHONY: venv report test test-notebooks test-pytest export-check clean-nbs browser-deps

$(STAMP): settings.ini setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

venv: $(STAMP)

report: venv
	$(BIN)/t2sql report --profile $(PROFILE) --out $(OUT)

# The package must equal a fresh export of the notebooks.
export-check: venv
	$(BIN)/nbdev_export
	@if [ -n "$$(git status --porcelain -- t2sql_nb)" ]; then \
		echo "t2sql_nb/ differs from a fresh nbdev_export of nbs/:"; git status --porcelain -- t2sql_nb; exit 1; fi

test-notebooks: venv
	$(BIN)/nbdev_test --n_workers 2 --timing

test-pytest: venv
	$(BIN)/python -m pytest -q tests

test: export-check test-notebooks test-pytest

clean-nbs: venv
	$(BIN)/nbdev_clean
