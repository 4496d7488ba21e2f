# The two commands of the README. Each sets up .venv first (scripts/setup.sh, idempotent).
.PHONY: quickstart test setup

setup:
	@bash scripts/setup.sh

quickstart: setup
	.venv/bin/densiray quickstart

test: setup
	.venv/bin/ruff check src tests jobs
	.venv/bin/python -m pytest -q tests
