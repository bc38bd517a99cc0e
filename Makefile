# streamtta: `make run` (main job) and `make test` (test suite) each create or refresh .venv first.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.streamtta-installed
# torch is pinned so pip takes the CPU build; set TORCH_PIP_ARGS (e.g. an --index-url) elsewhere if needed.
TORCH_PIP_ARGS ?=
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: venv run test bench checkpoints clean help gpu-check

help:
	@echo "make run    - embedded Kafka broker + built-in scenario through the engine, end to end"
	@echo "make test   - the test suite"
	@echo "make bench  - the README benchmark tables"
	@echo "make checkpoints - retrain the shipped source checkpoints"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/streamtta run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/streamtta bench simulations/digits-c-iid.toml simulations/digits-c-sorted.toml \
		--methods source,bn --seeds 1,2,3 --json runs/bench-basic.json --plot runs/bench-basic.png

gpu-check: $(STAMP)
	$(PY) -m streamtta.gpucheck --device cuda $(ARGS)

checkpoints: $(STAMP)
	$(VENV)/bin/streamtta train-source --dataset digits --seed 0 --out streamtta/models/checkpoints/digits-resnet.pt
	$(VENV)/bin/streamtta train-source --dataset segment --seed 0 --out streamtta/models/checkpoints/segment-mlp.pt
	$(VENV)/bin/streamtta meta-train --model digits-resnet --seed 0
	# tuning-side GroupNorm / LayerNorm variants, and the held-out backbones (never used for tuning)
	for r in digits-resnet-gn digits-resnet-ln; do \
		$(VENV)/bin/streamtta train-source --dataset digits --recipe $$r --seed 0 --out streamtta/models/checkpoints/$$r.pt; done
	for r in digits-cnn digits-cnn-gn digits-cnn-ln; do \
		$(VENV)/bin/streamtta train-source --dataset digits --recipe $$r --seed 1 --out streamtta/models/checkpoints/$$r.pt; done
	$(VENV)/bin/streamtta train-source --dataset segment --recipe segment-mlp-ln --seed 1 --out streamtta/models/checkpoints/segment-mlp-ln.pt
	# the held-out digits CNN's meta-initialisation (for the meta restart on heldout-digits-cnn-long)
	$(VENV)/bin/streamtta meta-train --model digits-cnn --seed 0

clean:
	rm -rf $(VENV) .pytest_cache runs .streamtta
