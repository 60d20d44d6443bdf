# llamaherd: one-command setup. `make run` runs the main job, `make test` the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
HERD   := $(VENV)/bin/herd
# The CPU wheel of torch, installed before the package so its `torch>=2.5` is already met.
TORCH  := torch==2.13.0
# The default model (Gemma 3 270M, pretrained) is a base model: it continues text rather than answering
# questions, so the first run gives it a sentence to complete; the reply is bounded so `make run` always ends.
PROMPT ?= The planets of the solar system, in order from the Sun, are Mercury,
RUN_FLAGS ?= --max-tokens 40

.PHONY: run test test-all install install-test browser bench clean llamacpp-tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[serve,models]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[serve,models,test]"
	# torchvision for Meta's image transforms (the vision tests' reference): the registries hold only CUDA builds,
	# whose import breaks `import transformers` inside the environment, so it lives beside it and only
	# tests/vision_fixtures.py puts it on the path.
	$(PIP) install --no-deps --target $(VENV)/vision-extra torchvision==0.28.0
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(HERD) run $(RUN_FLAGS) "$(PROMPT)"

# The web chat page's browser test drives Debian's chromium through chromium-driver: installed here when apt
# is available (as root), else that test skips saying why.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } || \
		echo "make: chromium/chromium-driver not installed; the web page's browser test will skip"

test: install-test browser
	$(PY) -m pytest -q

# llama.cpp's own llama-quantize and llama-imatrix, built once from the installed llama-cpp-python's sdist into a
# cache outside the repository (bench/llamacpp_tools.py); cmake and ninja come from pip where the system lacks them.
llamacpp-tools: install-test
	@command -v cmake >/dev/null 2>&1 && command -v ninja >/dev/null 2>&1 || $(PIP) install -e ".[llamacpp-tools]"
	$(PY) bench/llamacpp_tools.py

test-all: install-test browser llamacpp-tools
	$(PY) -m pytest -q -m "slow or not slow"

# The default model against llama.cpp, side by side (bench/side_by_side.py; more in BENCHMARKS.md).
bench: install-test
	$(PY) bench/side_by_side.py --threads 2 --gguf gemma-3-270m-q4_k_m

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
