# Every tool comes from the venv that `make venv` maintains, never from $PATH.
VENV := .venv
PYTHON := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff
MYPY := $(VENV)/bin/mypy
PYTEST := $(VENV)/bin/pytest

.PHONY: venv test lint demo bench vendor dist

venv:
	@scripts/bootstrap.sh

# Run every check even when one fails, so one run shows all the damage, and
# fail if any did.
test: venv
	@status=0; \
	$(RUFF) check src tests bench || status=1; \
	$(MYPY) src tests || status=1; \
	$(PYTEST) || status=1; \
	exit $$status

lint: venv
	@status=0; \
	$(RUFF) check src tests bench || status=1; \
	$(MYPY) src tests || status=1; \
	exit $$status

demo: venv
	$(VENV)/bin/pgfleet demo

# One script after the other: benchmarks running together measure each other.
bench: venv
	@set -e; for script in bench/*.py; do \
		[ -e "$$script" ] || continue; \
		echo "== $$script"; \
		$(PYTHON) "$$script"; \
	done

# The web UI's uPlot, committed under src/pgfleet/web/static/vendor/, refreshed
# from npm at the version package-lock.json pins (see scripts/vendor.sh).
vendor:
	@scripts/vendor.sh

# An sdist and a wheel in dist/ (see docs/install.md); the wheel is built from the sdist.
dist: venv
	rm -rf dist
	$(PYTHON) -m build --outdir dist .
