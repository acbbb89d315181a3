# The two commands of the README: `make demo` and `make test`. Both install first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sdbatch-installed
DEMO   := build/demo
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo demo-images test test-fast clean

install: $(STAMP)

# torch first and alone, pinned: an unpinned torch (or one pulled in by another package) drags in
# gigabytes of CUDA wheels; with 2.13.0 present every other package installs in about a minute.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	mkdir -p $(DEMO)
	$(BIN)/python examples/make_demo_manifest.py $(DEMO)/prompts.parquet
	$(BIN)/sdbatch run configs/demo.yaml --manifest $(DEMO)/prompts.parquet \
		--output $(DEMO)/run-$$(date -u +%Y%m%dT%H%M%S)
	$(MAKE) demo-images

# The image tasks (variations, x4 upscaling) on their tiny presets, with generated input images.
demo-images: install
	mkdir -p $(DEMO)
	for task in variation upscale; do \
		$(BIN)/python examples/make_image_manifest.py $(DEMO)/$$task-inputs --task $$task && \
		$(BIN)/sdbatch run configs/demo-$$task.yaml --manifest $(DEMO)/$$task-inputs/$$task.parquet \
			--output $(DEMO)/$$task-run-$$(date -u +%Y%m%dT%H%M%S) || exit 1; \
	done

test: install
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

# Everything but the tests marked e2e (they start Ray or run a job; tests/conftest.py enforces the mark) or
# slow (torch.compile on CPU).
test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
