VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

# The main job: CORY on the sentiment task (two coevolving copies of the embedded review writer),
# then a table of the initial model vs both agents and the plots.
demo: setup
	$(VENV)/bin/cory train --config examples/cory_sentiment.yaml --output-dir $(RUN)
	$(VENV)/bin/cory report $(RUN)

test: setup
	$(PY) -m pytest -q -n auto --dist loadfile

bench: setup
	$(PY) benchmarks/zoo_build.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/algorithms.py
	$(PY) benchmarks/cory_memory.py
	$(PY) benchmarks/coevolution.py
	$(PY) benchmarks/bandits.py
	$(PY) benchmarks/kl_budget.py

clean:
	rm -rf runs .pytest_cache
