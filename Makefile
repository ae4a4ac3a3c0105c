# The whole set-up on a fresh machine is one of these two commands:
#   make demo   build the shipped shards and run the digits_demo experiment end to end
#   make test   run the test suite (what CI runs, through .ci/run)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test shards venv clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,tools,test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

data/digits/database/manifest.json: $(STAMP) shards/digits.py shards/writer.py
	$(PY) -m shards.write digits --out data/digits --no-progress

data/digits_loop/test/manifest.json: $(STAMP) shards/digits.py shards/writer.py
	$(PY) -m shards.write digits --protocol loop --out data/digits_loop --no-progress

data/digits_open/test/manifest.json: $(STAMP) shards/digits.py shards/writer.py
	$(PY) -m shards.write digits --protocol open --out data/digits_open --no-progress

shards: data/digits/database/manifest.json data/digits_loop/test/manifest.json data/digits_open/test/manifest.json

demo: shards
	$(PY) launch/submit.py --exp digits_demo

test: venv
	$(PY) -m pytest -q --durations=15 tests

clean-runs:
	rm -rf runs
