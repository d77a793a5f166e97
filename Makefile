# Two commands on a fresh machine:
#   make demo   set up .venv, pull the default models, run the main job (speculative comparison)
#   make test   set up .venv, run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
SEMIAR := $(VENV)/bin/semiar
STAMP := $(VENV)/.semiar-installed
TARGET ?= qwen2.5-coder-1.5b-instruct
DRAFT ?= qwen2.5-coder-0.5b-instruct
DEMO_OUT ?= runs/demo
SMALL ?= smollm2-135m-instruct

.PHONY: install demo test test-slow clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build first: a bare torch requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(SEMIAR) models pull $(TARGET)
	$(SEMIAR) models pull $(DRAFT)
	$(SEMIAR) bench --target $(TARGET) --draft-model $(DRAFT) --methods ar,draft,pld,ngram,copy,falcon,auto \
		--tasks code,edit --n-prompts 2 --max-new-tokens 96 --out $(DEMO_OUT)
	# Falcon with the drafter the package ships for SmolLM2-135M (docs/falcon.md)
	$(SEMIAR) models pull $(SMALL)
	$(SEMIAR) bench --target $(SMALL) --methods ar,falcon,pld,auto --tasks code,edit,chat --n-prompts 2 \
		--max-new-tokens 96 --out $(DEMO_OUT)/falcon
	@echo "reports: $(DEMO_OUT)/report.md, $(DEMO_OUT)/falcon/report.md"

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
