#!/usr/bin/env bash
# Installs llama-cpp-python (llama.cpp's own reader) into the venv, for the tests that read aift's GGUF
# exports back with llama.cpp. It ships as an sdist that compiles llama.cpp (~15 minutes on 2 cores), so the
# built wheel is kept in a cache and later set-ups (and fresh clones on the same machine) install it at once.
#   usage: setup/build_llama_cpp.sh .venv/bin/python
# Any failure prints one note and exits 0: nothing else needs llama.cpp, and its tests skip without it.
set -u
VERSION=0.3.36  # keep in step with the gguf-check extra in pyproject.toml
PYTHON=${1:-.venv/bin/python}
CACHE=${AIFT_WHEEL_CACHE:-$HOME/.cache/aift/wheels}

note() {
  echo "setup: note: llama-cpp-python could not be built; the llama.cpp GGUF tests skip"
  [ -n "${1:-}" ] && echo "setup:       ($1)"
  exit 0
}

# A portable x86-64-v3 build (AVX2, FMA, F16C, BMI2) rather than -march=native: the wheel outlives this set-up
# in the cache, and a native build would die with SIGILL on an older CPU sharing the same home. CPUs
# without those get llama.cpp's plain native build (keyed apart in the cache by its flags).
cmake_args="-DGGML_BLAS=OFF -DLLAMA_CURL=OFF"
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
v3=yes
for f in avx2 fma f16c bmi2; do
  [[ " $flags " == *" $f "* ]] || v3=no
done
if [ "$v3" = yes ]; then
  cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON $cmake_args"
else
  cmake_args="-DGGML_NATIVE=ON $cmake_args"
fi

imports() { "$PYTHON" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" >/dev/null 2>&1; }
imports && exit 0

"$PYTHON" -c pass >/dev/null 2>&1 || note "no python at $PYTHON"
# The wheel is py3-none-<platform> (llama_cpp loads its compiled library with ctypes): one per build flags and
# machine, whatever the Python.
key=$(printf '%s %s' "$(uname -m)" "$cmake_args" | sha256sum | cut -c1-8)
dir="$CACHE/llama-cpp-python-$VERSION-$key"
wheel=$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1)
if [ -z "$wheel" ]; then
  mkdir -p "$CACHE" || note "cannot create $CACHE"
  log="$CACHE/llama-cpp-python-$VERSION-$key.log"
  echo "setup: building llama-cpp-python $VERSION from source (~15 min on 2 cores; log: $log; cached in $dir)"
  tmp=$(mktemp -d "$CACHE/.build-XXXXXX") || note "cannot write to $CACHE"
  # --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and could hand back a build with other flags.
  if ! CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PYTHON" -m pip wheel --no-deps --no-cache-dir -w "$tmp" "llama-cpp-python==$VERSION" >"$log" 2>&1; then
    rm -rf "$tmp"
    note "the build failed; see $log"
  fi
  # The finished wheel appears in the cache in one rename, so an interrupted build leaves nothing to reuse.
  rm -rf "$dir" && mv "$tmp" "$dir" || note "cannot move the wheel into $dir"
  wheel=$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1)
  [ -n "$wheel" ] || note "the build produced no wheel; see $log"
fi
echo "setup: installing $(basename "$wheel")"
"$PYTHON" -m pip install -q "$wheel" || note "pip could not install $wheel"
imports || {
  "$PYTHON" -m pip uninstall -q -y llama-cpp-python
  note "the installed llama_cpp does not import (built for another CPU?); remove $dir to rebuild"
}
exit 0
