# deploy-prune developer commands. `make demo` and `make test` work alone on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# This machine's pip serves these CUDA builds from local disk (they run on the CPU too);
# PyPI's torchvision does not import beside the smaller torch 2.13 CPU wheel. Users of the
# package get the loose ranges in pyproject.toml instead.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
RUN    := runs/demo

.PHONY: install demo test test-all bench lint data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev,openvino]' $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deploy-prune train --model tiny-cnn --data digits --epochs 15 --out $(RUN)
	$(BIN)/deploy-prune export $(RUN) --out $(RUN)/model.onnx
	$(BIN)/deploy-prune benchmark $(RUN)/model.onnx --target cpu-ort --out $(RUN)/latency.json
	@echo
	@echo "demo outputs in $(RUN)/:"
	@echo "  model.pt          trained checkpoint (loads with weights_only=True)"
	@echo "  metrics.json      validation accuracy, per-epoch history, training time"
	@echo "  checkpoints/      per-epoch checkpoint for --resume"
	@echo "  model.onnx(.json) exported model and its parity check against torch"
	@echo "  latency.json      latency on cpu-ort: median, p90, spread, provenance"

test: $(STAMP)
	$(BIN)/pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/measure_stability.py

lint: $(STAMP)
	$(BIN)/ruff check deploy_prune tests benchmarks
	$(BIN)/mypy deploy_prune

# Fashion-MNIST as a Debian package (IDX files under /usr/share/datasets/fashion-mnist).
data:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

clean:
	rm -rf runs/demo .pytest_cache .mypy_cache .ruff_cache
