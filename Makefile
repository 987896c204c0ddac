# Two commands do everything on a fresh machine:
#   make demo   -- the main job on the embedded default model
#   make test   -- the whole test suite
# Both create .venv on first use (pip, through constraints.txt: torch==2.13.0, a CPU wheel here).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: demo test test-fast test-demo venv bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dreamblend demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The full demo at its defaults against the recorded run (about 8 minutes on 2 cores).
test-demo: $(STAMP)
	DREAMBLEND_DEMO_CHECK=1 $(PY) -m pytest tests/test_demo_record.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
