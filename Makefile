# The two set-up commands of the README: `make run` and `make test`.
DATA ?= ./var

.PHONY: run test lint unit e2e clean

run:
	@scripts/bootstrap.sh
	.venv/bin/vod up --data $(DATA)

test:
	@scripts/bootstrap.sh dev
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/pytest -q -p no:cacheprovider --backend=embedded
# then the backend-dependent tests again on PostgreSQL + Redis + S3 (moto; tests/backends.py)
	.venv/bin/pytest -q -p no:cacheprovider --backend=scale tests/integration tests/e2e

lint:
	@scripts/bootstrap.sh dev
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

unit:
	@scripts/bootstrap.sh dev
	.venv/bin/pytest -q tests/unit

e2e:
	@scripts/bootstrap.sh dev
	.venv/bin/pytest -q tests/e2e

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
