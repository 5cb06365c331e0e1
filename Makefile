# The two commands: `make demo` and `make test`. Both create .venv when missing (pinned, CPU-only).
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
PIP := $(VENV)/bin/pip

.PHONY: demo posttrain-demo test test-fast test-gpu lint clean-venv

$(STAMP): requirements.txt requirements-test.txt requirements-eval.txt requirements.lock setup.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c requirements.lock -r requirements.txt -r requirements-test.txt \
		-r requirements-eval.txt
	$(PIP) install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -W ignore examples/demo.py --output-dir demo_out

posttrain-demo: $(STAMP)
	$(VENV)/bin/python -W ignore examples/posttrain_demo.py --output-dir posttrain_demo_out

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-gpu: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m gpu

clean-venv:
	rm -rf $(VENV)
