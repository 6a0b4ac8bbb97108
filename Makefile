# Quick start: `make run` runs the main job, `make test` runs the tests.
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

# Several fake CPU devices so that sharding is really exercised on a laptop.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: run test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: $(PY) setup.py requirements.txt
	$(PY) -m pip install --quiet -e ".[run]"
	touch $@

$(VENV)/.installed-test: $(PY) setup.py requirements.txt
	$(PY) -m pip install --quiet -e ".[run,test]"
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(PY) experiments/run.py $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	# bench/gpu.py needs a GPU machine; timing.py and peer_configs.py are helpers, not benchmarks.
	# Timings on one CPU device: the fake devices exported above are for sharding tests and add
	# XLA:CPU dispatch cost to every op. pipeline.py and learning.py ask for their own devices.
	for f in env curriculum model sampler learner pipeline learning; do echo "== bench/$$f.py"; env -u XLA_FLAGS $(PY) bench/$$f.py || exit 1; done

clean:
	rm -rf $(VENV) outputs .pytest_cache
