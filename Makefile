# Two commands do all the set-up on a fresh machine:
#   make demo   the whole pipeline on a tiny model and synthetic data in the real formats
#   make test   the test suite
# Both create (or reuse) the virtual environment $(VENV). torch 2.13.0 is installed only when no torch is
# importable: on a GPU host whose system Python already has a CUDA torch, the environment sees it
# (--system-site-packages) and it is pinned in place, never replaced.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rmpl_ds-installed
PYTEST_ARGS ?=
DEMO_OUT ?= demo_out

.PHONY: all install demo compare test test-fast lint clean-demo

all: test

$(STAMP): setup.cfg pyproject.toml
	@if [ ! -x $(PY) ]; then \
		if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
			echo "using the system torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
			$(PYTHON) -m venv --system-site-packages $(VENV); \
		else \
			$(PYTHON) -m venv $(VENV); \
		fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "installing torch==2.13.0"; \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	@# Pin whatever torch is importable so that resolving our dependencies can never replace it.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the demo: synthetic data in the real raw formats + a tiny random-init Qwen2-VL, then shards,
# Stage I and Stage II on 2 CPU ranks, evaluation of the base / Stage I / Stage II models and the report.
$(DEMO_OUT)/raw/.complete: $(STAMP)
	$(VENV)/bin/rmpl-ds demo-data --out $(DEMO_OUT)/raw --tiny-model $(DEMO_OUT)/models/tiny-qwen2-vl
	@touch $@

demo: $(DEMO_OUT)/raw/.complete
	$(VENV)/bin/rmpl-ds pipeline launch/recipes/demo.yaml

# Four training strategies on the demo (RMPL, X-MTL, LLaVA-MS-PIT, M-MRE's joint task): each recipe's pipeline, then
# one Table 2 and one bar chart in bench/results/compare.{md,json} and compare_f1.png (bench/compare_strategies.py).
compare: $(DEMO_OUT)/raw/.complete
	$(PY) bench/compare_strategies.py

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check rmpl_ds tests bench

clean-demo:
	rm -rf $(DEMO_OUT)
