# The two commands at the top of the README:
#   make serve   set up .venv, build the tiny models, run the local service
#   make test    set up .venv with test extras, run the tests (loopback-only namespace)
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=

.PHONY: serve test bench lint proto constraints clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and exact: an open pin would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,loadtest,capacity,safety,provenance]'
	# the invisible watermark's library, without the opencv-python and torch its
	# metadata asks for (the headless OpenCV and the exact torch above serve it)
	$(PIP) install -q --no-deps invisible-watermark==0.2.0
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/imagegen models build
	scripts/loopback-serve

test: $(VENV)/.installed
	scripts/loopback $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	scripts/loopback $(VENV)/bin/imagegen bench serve

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check serve autoscaling tests

# constraints.txt: the versions the suite ran with, which the container image installs.
constraints: $(VENV)/.installed
	{ sed -n '1,3p' constraints.txt; $(PIP) freeze --exclude-editable \
	  | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# The gRPC stubs in serve/ingress/proto from proto/ (committed; see scripts/gen_proto.py).
proto: $(VENV)/.installed
	$(VENV)/bin/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
