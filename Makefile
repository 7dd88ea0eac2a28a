# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install pretune with what it needs; torch is pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench-shakespeare clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pretune demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-shakespeare: $(STAMP)
	$(BIN)/python benchmarks/shakespeare_char.py

clean:
	rm -rf $(VENV) runs .pytest_cache
