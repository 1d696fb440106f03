# Two commands: `make quickstart` and `make test`. Both create (or reuse) .venv and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install quickstart test lint format schema mlflow-ui clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24" "setuptools>=68" wheel
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

quickstart: install
	$(BIN)/squeeze run configs/quickstart.yaml

# two workers, a test file each: the suite spends much of its time waiting on servers and fresh processes
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

schema: install
	$(BIN)/squeeze schema

# MLflow 3 opens on its GenAI view; the query string opens the runs table of the experiments instead
mlflow-ui: install
	@echo "runs: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/artifacts/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf artifacts/runs artifacts/mlflow.db artifacts/mlartifacts
