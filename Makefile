# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch and torchvision must come as a matching pair; on this machine kind (x86_64,
# Python 3.11) pip takes these from local disk. Override TORCH for other machines.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.nas-installed

.PHONY: setup data demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

data:
	@sh scripts/ensure-fashion-mnist.sh

demo: setup data
	$(BIN)/nas search

test: setup
	@sh scripts/ensure-fashion-mnist.sh || echo "make: continuing; the Fashion-MNIST tests will be skipped"
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
