# Two commands for users: `make demo` and `make test`. Each one creates or
# updates .venv itself from pyproject.toml; nothing is installed by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0

.PHONY: demo demo-tower test test-all venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first, pinned: a later unpinned dependency must not pull another build.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[gen,tfds,eval,test]'
	# sam2 ships as an sdist; build it against the torch above, without CUDA ops.
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation 'sam2==1.1.0'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.demo

# Train the demo's vision tower again (about 1 h 25 min on 2 cores) and write configs/demo_tower.npz.
demo-tower: $(STAMP)
	$(PY) -m launch.demo --train-tower

# Two pytest workers (pytest-xdist), each test file on one worker so that its module fixtures run once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs .pytest_cache
