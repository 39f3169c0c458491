# Two commands for a fresh machine (Python 3.11): `make app` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 7860
# torch is pinned and installed first, alone, so the rest cannot pull another build; which build (CPU or CUDA)
# is the configured index's: override TORCH to choose (README, "GPU installs").
TORCH ?= torch==2.13.0

.PHONY: install install-test warm-start app test test-fast chromium clean mutations gpu-bench gpu-bench-smoke gpu-wheels

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) install --quiet -r requirements-test.txt
	touch $@

# install also trains the public warm start once (a progress bar, about 5 minutes), so the app's first run does
# not wait for it; `make test` does not need it (tests build their models untrained).
install: $(VENV)/.installed warm-start

warm-start: $(VENV)/.installed
	$(PY) -m toolkit warm-start --preset tiny

install-test: $(VENV)/.installed-test chromium

# Debian's Chromium for the browser end-to-end test (Playwright drives it; it never downloads a browser).
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium) || \
	  (echo "could not install chromium: the browser test will be skipped" >&2)

app: install
	$(PY) app.py --host $(HOST) --port $(PORT)

# Everything CI runs: every test, the doctests of the public API, and the 15 slowest durations.
test: install-test
	$(PY) -m pytest -q --durations=15

# The fast lane while working: no slow or browser tests, no doctests (under 90 s on 2 quiet cores).
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow and not browser" --durations=10 tests

# issue 20: named semantic mutations of the privacy engine applied to a scratch copy; the privacy tests must kill
# every one (slow lane: about 10 minutes on 2 cores; the table goes to benchmarks/RESULTS.md)
mutations: install-test
	$(PY) benchmarks/mutations.py --markdown

clean:
	rm -rf $(VENV) .pytest_cache artifacts

# The GPU table (issue 23): CUDA, >= 80 GB, <= 8 min; writes benchmarks/results/gpu-<date>.json and .md.
gpu-bench: $(VENV)/.installed
	PYTHONPATH=. $(PY) benchmarks/gpu_bench.py

# The same code path on a CPU, tiny preset (tests/test_gpu_bench.py runs it in CI).
gpu-bench-smoke: $(VENV)/.installed
	PYTHONPATH=. $(PY) benchmarks/gpu_bench.py --smoke --out artifacts/gpu-bench-smoke

# For a CUDA machine without internet whose python3 holds torch: the pinned libraries as wheels in .whl/ (here),
# then `bash benchmarks/gpu_device.sh` there with .whl/ beside the repository.
gpu-wheels: $(VENV)/.installed
	$(PY) benchmarks/gpu_wheels.py
