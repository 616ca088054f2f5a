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

.PHONY: install install-bench demo test test-all bench lint data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev,openvino,torch,timm,tracking,ultralytics]' $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP)

# the peers benchmarks/peer_comparison.py runs against (Torch-Pruning is a runtime dependency)
$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]' $(TORCH_PINS)
	touch $@

install-bench: $(VENV)/.bench

# 50 % of the measured latency. On a CPU where the tiny CNN's narrowest widths measure more than
# that, compress exits 3 naming the floor, and the demo asks for 60 % instead.
COMPRESS_DEMO = $(BIN)/deploy-prune compress --weights $(RUN)/base --data digits --target cpu-ort-1t \
	    --epochs 10 --lr 0.05 --step-fraction 1 --profiles $(RUN)/profiles --out $(RUN)/compressed
demo: $(STAMP)
	$(BIN)/deploy-prune train --model tiny-cnn --data digits --epochs 15 --out $(RUN)/base
	$(COMPRESS_DEMO) --latency-ratio 0.5 || { rc=$$?; [ $$rc -eq 3 ] || exit $$rc; \
	    echo "50 % is below what this machine can reach (above): compressing to 60 % instead"; \
	    $(COMPRESS_DEMO) --latency-ratio 0.6; }
	@echo
	@echo "demo outputs in $(RUN)/:"
	@echo "  base/                  the trained tiny CNN (model.pt, metrics.json, checkpoints/)"
	@echo "  profiles/cpu-ort-1t/   its latency lookup table, measured here"
	@echo "  compressed/            model.onnx, model.pt, model.pt2, report.json/.md/.html, plots, sensitivity.json"
	@echo "  check it in CI with:   $(BIN)/deploy-prune gate $(RUN)/compressed/report.json --max-accuracy-drop 0.05"

# Two workers, one per core (each computes on one thread: tests/conftest.py); a file's tests stay
# on one worker, so its module fixtures are built once.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow" -q --durations=15

test-all: $(STAMP)
	$(PYTEST) -q

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

# deploy-prune's CUDA paths on this machine's GPU in about five minutes, with the .venv as it is
# (no install step): benchmarks/results/device_check.json and .md (docs/backends.md).
# Arguments through DEVICE_CHECK_ARGS, e.g. DEVICE_CHECK_ARGS="runs/gpu.json --budget-s 240".
# The lent GPU machine has its own Python 3.12 with torch, onnx and onnxruntime but not these:
# `make device-wheels` here puts them in .whl/ (carried with the checkout, under its 64 MiB),
# and device_check.sh installs them there before it starts.
DEVICE_WHEELS := torch-pruning==1.6.1 onnx2torch==1.5.15 pydantic==2.14.4 pydantic-core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5
device-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl $(DEVICE_WHEELS)

.PHONY: device-check device-wheels
device-check:
	benchmarks/device_check.sh $(DEVICE_CHECK_ARGS)
