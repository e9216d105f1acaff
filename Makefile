# The two commands: `make run` (the platform) and `make test` (the whole suite).
# Both create .venv and install the pinned requirements when needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt constraints.txt | sha256sum | cut -c1-12)

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run serve test lint check venv browser-deps bench chaos train-demo-model generalisation clean

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(PY) scripts/run_platform.py

# The production shape on this host, DEBUG off: check --deploy, migrate, collectstatic, then gunicorn,
# a Celery worker and Celery beat. Needs the production settings, secrets as *_FILE (docs/deployment.md);
# e.g. make serve SERVE_ARGS="--processes worker --no-migrate" on a worker host.
serve: venv
	$(PY) scripts/serve.py $(SERVE_ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

check: venv
	DEBUG=true $(PY) manage.py check
	DEBUG=true $(PY) manage.py makemigrations --check --dry-run
	DEBUG=true $(PY) manage.py spectacular --validate --fail-on-warn --file /dev/null

test: lint check browser-deps
	DEBUG=true $(PY) -m pytest $(PYTEST_ARGS)

# Browser tests drive Debian's Chromium; installed here when missing and we may (root + apt).
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver (Debian packages) for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "Chromium is not installed: browser tests will skip (and fail under CI=true)"; \
	  fi; \
	fi

# The serving path (naive vs served vs kernel, latency, memory; var/bench.json), then the platform
# around it on PostgreSQL + Redis with real worker and web processes (drain vs kernel, uploads, a
# 20 patches/s load test, two workers vs one; var/bench_platform.json) and audit appends
# (var/bench_audit.json), then whole-slide analysis with the slide core (var/bench_slides.json), then a
# whole slide through the Celery slide job on PostgreSQL + Redis (one worker vs two, time to first
# result, peak worker RSS for a slide and one 4x larger; var/bench_slide_workers.json). bench_platform,
# bench_audit and bench_slide_workers make and drop databases of their own on BENCH_DATABASE_URL's server.
BENCH_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
bench: venv
	$(PY) scripts/bench.py --json var/bench.json
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) scripts/bench_platform.py --json var/bench_platform.json
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) scripts/bench_audit.py --json var/bench_audit.json
	$(PY) scripts/bench_slides.py --json var/bench_slides.json
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) scripts/bench_slide_workers.py --json var/bench_slide_workers.json

# Faults while patches flow (scripts/chaos.py --long): 50 worker SIGKILLs, the broker restarted, the
# image store full, PostgreSQL restarted, on real processes; lost / twice / half stored / recovery
# (var/chaos.json). It restarts this machine's Redis and PostgreSQL servers: not while others use them.
chaos: venv
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) scripts/chaos.py --long --json var/chaos.json

# Retrain the bundled demo model from ../shared/data with recipe v3, with leave-one-dataset-out
# and simulated-other-lab figures for v3 and, for comparison, the v2 recipe (about 15 minutes on 2 CPU cores).
train-demo-model: venv
	DEBUG=true $(PY) manage.py train_model --leave-one-dataset-out --compare-recipe v2 \
	  --name tissue-mobilenetv2-demo --model-version 3 --out inference/demo_model

# Leave-one-dataset-out and simulated-other-lab figures of recipes v2 and v3 (no model written).
generalisation: venv
	$(PY) scripts/generalisation.py --json var/generalisation.json

clean:
	rm -rf var .pytest_cache .ruff_cache
