# Everything a fresh machine needs: `make run` and `make test` do all the set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch, pinned: an unpinned `torch` pulls several GB of CUDA packages.
TORCH  := torch==2.13.0
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data browser run test lint docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The gates' and the site's tools, pinned, in the same venv (installed once, again when pyproject.toml changes).
$(VENV)/.lint: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $@

$(VENV)/.docs: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,docs]'
	touch $@

# Debian's dataset-fashion-mnist when apt is here; otherwise fedforge downloads the files itself.
data:
	@if [ ! -f $(FASHION_MNIST) ] && command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; \
	fi

# Debian's chromium for the dashboard's browser test (tests/network/test_dashboard.py); where apt is
# missing or the install fails, the build goes on and that test is skipped with the reason.
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium) || \
		echo "chromium could not be installed: the dashboard's browser test will be skipped"; \
	fi

run: install data
	$(BIN)/fedforge run --dataset fashion-mnist --name tutorial-fashion-mnist

# Two test processes (pytest-xdist), each test file whole in one of them (its module-scoped servers
# and Ray cluster start once): the suite is mostly waits on processes and sockets, one torch thread each.
TEST_WORKERS ?= 2

test: install data browser
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src

# docs/cli.md is written from the command line's parser (tests/test_docs.py checks it is current);
# --strict: a broken link or API reference fails the build. The site goes to site/.
docs: $(VENV)/.docs
	$(BIN)/python docs/gen_cli.py
	$(BIN)/mkdocs build --strict

bench: install data
	$(BIN)/python benchmarks/tutorial_vs_fedforge.py
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/convnets.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .hypothesis
