# The two commands that matter:  make course  (run the course)  and  make test  (run the tests).
# Both create .venv and install everything they need; nothing else is required on a fresh machine
# beyond Python >= 3.10 with venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SCALE ?= course
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: course compare test install nbtest pytest gpu-test test-lowest export clean-nbs docs docs-check readme bench help

help:
	@echo "make course   - set up .venv and execute every chapter at SCALE=$(SCALE) (SCALE=smoke make course for a quick pass; a rerun resumes, FRESH=1 starts over)"
	@echo "make compare  - after make course: each printed line of the run that differs from the committed outputs in nbs/ (timings left out)"
	@echo "make test     - set up .venv and run nbdev_test (smoke scale, all notebooks) and pytest tests/"
	@echo "make gpu-test - on a CUDA machine: pytest -m cuda, every chapter's full-scale training step (time, peak memory), every notebook on the GPU, full-scale peak memory in float32"
	@echo "make test-lowest - the tests and notebooks in a separate venv with the lowest version of every requirement settings.ini allows (LOWEST_MODE=old-torch: torch lowest, the rest newest)"
	@echo "make docs     - build the docs site (Quarto if installed, else static HTML in _docs/)"
	@echo "make docs-check - build the docs, open every page in headless Chromium, fail on a blank page, a missing figure or chapter"
	@echo "make readme   - regenerate README.md from nbs/index.ipynb"
	@echo "make export   - nbdev_export + nbdev_clean (run before every commit)"

$(STAMP): settings.ini setup.py pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and exactly pinned: a bare 'torch' could pull another (multi-GB) build
	$(BIN)/python -m pip install -q -c .ci/constraints.txt torch torchaudio
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

NB_WORKERS ?= 2
# torch threads: never more, over all processes, than the cores we may use (tools/cpu_budget.py says why)
THREADS = $${OMP_NUM_THREADS:-$$($(BIN)/python tools/cpu_budget.py --per $(1))}

# a rerun resumes (chapters already executed from the same sources are skipped); FRESH=1 executes every chapter again
course: $(STAMP)
	t=$(call THREADS,1); SPEECHLLM_SCALE=$(SCALE) OMP_NUM_THREADS=$$t MKL_NUM_THREADS=$$t $(BIN)/python tools/run_course.py --scale $(SCALE) $(if $(FRESH),--fresh,)

# informational: exits 1 when some chapter prints otherwise than the committed notebook (expected on another CPU)
compare: $(STAMP)
	$(BIN)/python tools/compare_outputs.py --scale $(SCALE)

nbtest: $(STAMP)
	t=$(call THREADS,$(NB_WORKERS)); echo "nbdev_test: $(NB_WORKERS) workers x $$t torch threads"; \
	SPEECHLLM_SCALE=smoke OMP_NUM_THREADS=$$t MKL_NUM_THREADS=$$t $(BIN)/nbdev_test --n_workers $(NB_WORKERS) --timing

pytest: $(STAMP)
	t=$(call THREADS,1); SPEECHLLM_SCALE=smoke OMP_NUM_THREADS=$$t MKL_NUM_THREADS=$$t $(BIN)/python -m pytest tests/ -q

# nbdev_test prints only "Success."; pytest runs last so its closing line is the one CI reads
test: $(STAMP)
	$(MAKE) --no-print-directory nbtest
	$(MAKE) --no-print-directory pytest

# results land in $$OUT (default /tmp/gpu_suite); bench/RESULTS.md records the last lent-GPU run
gpu-test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tools/gpu_suite.sh

# the requirement floors, tested (a separate venv under /tmp; needs PyPI)
test-lowest:
	bash tools/test_lowest.sh

export: $(STAMP)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

docs: $(STAMP)
	$(BIN)/python tools/build_docs.py

# needs a Chromium on PATH (Debian: apt-get install chromium); screenshots land in _docs/_check/
docs-check: docs
	$(BIN)/python tools/docs_check.py

readme: $(STAMP)
	$(BIN)/python tools/build_docs.py --readme-only

bench: $(STAMP)
	@for f in bench/*.py; do [ -e "$$f" ] || continue; echo "== $$f"; SPEECHLLM_SCALE=$${SPEECHLLM_SCALE:-smoke} $(BIN)/python $$f || exit 1; done
