VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

# The main job: fine-tune the embedded review writer towards positive sentiment, then plot.
demo: setup
	$(VENV)/bin/cory train --config examples/sentiment.yaml --output-dir $(RUN)
	$(VENV)/bin/cory report $(RUN)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/zoo_build.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/algorithms.py
	$(PY) benchmarks/cory_memory.py

clean:
	rm -rf runs .pytest_cache
