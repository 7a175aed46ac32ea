# Two entry points, each does its own set-up on a fresh machine:
#   make demo   build photos + edited copies, index them, print duplicate groups, write demo-out/query.png
#               and demo-out/report.html
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench weights clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	rm -rf demo-out
	$(BIN)/python -m neardup.demo demo-out/photos
	$(BIN)/neardup index demo-out/photos --index demo-out/index
	$(BIN)/neardup dups --index demo-out/index
	$(BIN)/neardup query demo-out/photos/edited/chelsea__crop80.jpg --index demo-out/index -k 9 --plot demo-out/query.png
	$(BIN)/neardup report --index demo-out/index --out demo-out/report.html
	@echo "see the groups in demo-out/report.html, or run: $(BIN)/neardup serve --index demo-out/index"

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/neardup bench -n 1000

# Reproduces the shipped copy-trained weights and whitening (benchmarks/TRAINING.md): about 50 min of
# training on 2 cores, then the whitening refit. Resumable: run it again after any stop.
COPY_RUN := lite0-cut5-e20-s0
weights: $(BIN)/.installed
	$(BIN)/python benchmarks/train_copy_descriptor.py train --run $(COPY_RUN) --cut 5 --epochs 20 --seed 0
	$(BIN)/python benchmarks/train_copy_descriptor.py ship --weights training-runs/$(COPY_RUN)/weights-epoch020.pt

clean:
	rm -rf $(VENV) demo-out
