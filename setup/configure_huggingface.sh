#!/usr/bin/env bash
# Stores a Hugging Face token for gated models (calls `aift login`; the token is never echoed).
# usage: setup/configure_huggingface.sh            (asks for it, hidden)
#        echo "$HF_TOKEN" | setup/configure_huggingface.sh --token-stdin
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m aift login "$@"
