# The two commands every user runs: `make demo` and `make test`.
# Each creates .venv on first use with a Python >= 3.12 and installs chunkbus into it.
VENV := .venv
PY := $(VENV)/bin/python
# Reinstall when the package definition changes.
INSTALLED := $(VENV)/.installed

.PHONY: test demo bench venv clean

test: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole system on this machine until Ctrl-C; POLICY=/path/to/checkpoint serves your own.
demo: $(INSTALLED)
	$(VENV)/bin/launch configs/local.yaml $(LAUNCH_ARGS)

# Every scripts/bench_*.py, side by side with the baselines; writes docs/benchmarks.md.
bench: $(INSTALLED)
	$(PY) scripts/bench_page.py $(BENCH_ARGS)

venv: $(INSTALLED)

$(PY):
	@python=$$(sh scripts/find_python.sh) || exit 1; \
	echo "creating $(VENV) with $$python ($$($$python --version))"; \
	$$python -m venv $(VENV)

$(INSTALLED): pyproject.toml setup.cfg | $(PY)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --editable '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info
