#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (CPU only) for the benchmarks that compare linly-lora with
# llama.cpp (benches/llamacpp_perplexity.py). Not part of CI.
#
#   benches/build_llama_cpp.sh                       # prefix: target/llama.cpp
#   LLAMA_CPP_DIR=/some/dir benches/build_llama_cpp.sh
#
# The source is the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist, fetched from PyPI by
# name (`pip download --no-binary`), so the version is pinned without a git clone. The build is
# CPU only, Release, -march=native (GGML_NATIVE), static, with no network code (no curl, no
# OpenSSL, no prebuilt web UI download). It builds only the tools the benchmarks use:
#   llama-perplexity llama-simple llama-bench llama-tokenize llama-quantize   (first, quick)
#   llama-batched-bench  (decode throughput at several batch sizes: the serving comparison)
#   llama-cli                                    (last: in this version it pulls in the server code)
# (llama-quantize re-exports a quantized GGUF as F32 for the exact-arithmetic comparison.)
# and copies them to $LLAMA_CPP_DIR/bin. Layout under $LLAMA_CPP_DIR:
#   src/   the sdist and the extracted llama.cpp source     build/  the cmake build tree
#   bin/   the tools                                          VERSION the source it was built from
#
# Idempotent: does nothing when every tool is already in bin/. Environment:
#   LLAMA_CPP_DIR   prefix (default: target/llama.cpp in this repository)
#   JOBS            parallel compile jobs (default: 2)
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default: 0.3.36)
# Run it under `nice -n 19` on a shared machine; the whole build takes ~10-20 min on 2 cores.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${LLAMA_CPP_DIR:-$REPO/target/llama.cpp}
JOBS=${JOBS:-2}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)

# llama-cli is last: the perplexity comparison only needs the first ones.
TOOLS=(llama-perplexity llama-simple llama-bench llama-tokenize llama-quantize llama-batched-bench llama-cli)

all_built() {
  local t
  for t in "$@"; do [ -x "$PREFIX/bin/$t" ] || return 1; done
}
if all_built "${TOOLS[@]}"; then
  echo "llama.cpp tools already built in $PREFIX/bin (delete it to rebuild)"
  exit 0
fi

missing=()
for cmd in cmake g++ make python3; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
python3 -m pip --version >/dev/null 2>&1 || missing+=("pip (python3 -m pip)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: missing build tools: ${missing[*]}" >&2
  echo "  on Debian/Ubuntu: apt-get install -y cmake g++ make python3-pip" >&2
  echo "  (cmake alone can also come from PyPI: python3 -m pip install cmake)" >&2
  exit 1
fi

SRC_DIR="$PREFIX/src"
SDIST="$SRC_DIR/llama_cpp_python-$VERSION.tar.gz"
LLAMA_SRC="$SRC_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
mkdir -p "$SRC_DIR"
if [ ! -f "$SDIST" ]; then
  echo "downloading the llama-cpp-python $VERSION sdist from PyPI ..."
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$SRC_DIR.tmp-$$"
  mv "$SRC_DIR.tmp-$$/llama_cpp_python-$VERSION.tar.gz" "$SDIST"
  rm -rf "$SRC_DIR.tmp-$$"
fi
if [ ! -f "$LLAMA_SRC/CMakeLists.txt" ]; then
  echo "extracting vendor/llama.cpp ..."
  tar -xzf "$SDIST" -C "$SRC_DIR" "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi
[ -d "$LLAMA_SRC/tools/batched-bench" ] || {
  echo "note: this llama.cpp has no llama-batched-bench; skipping it"
  TOOLS=("${TOOLS[@]/llama-batched-bench}")
}
[ -f "$LLAMA_SRC/tools/perplexity/perplexity.cpp" ] || {
  echo "error: $LLAMA_SRC does not look like llama.cpp (no tools/perplexity/perplexity.cpp)" >&2
  exit 1
}
[ -d "$LLAMA_SRC/tools/tokenize" ] || {
  echo "note: this llama.cpp has no llama-tokenize; skipping it"
  TOOLS=("${TOOLS[@]/llama-tokenize}")
}

BUILD="$PREFIX/build"
# LLAMA_CURL is deprecated in this llama.cpp (HTTP moved to cpp-httplib + OpenSSL); it is still
# passed so older vendored versions also build without curl. LLAMA_BUILD_SERVER is needed for
# llama-cli, which is a client of the server code in this version.
cmake -S "$LLAMA_SRC" -B "$BUILD" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON \
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
  >"$PREFIX/cmake-configure.log" 2>&1 || {
    tail -30 "$PREFIX/cmake-configure.log" >&2
    echo "error: cmake configure failed; full log: $PREFIX/cmake-configure.log" >&2
    exit 1
  }

mkdir -p "$PREFIX/bin"
install_tools() {
  local t
  for t in "$@"; do
    [ -n "$t" ] || continue
    cp "$BUILD/bin/$t" "$PREFIX/bin/$t.tmp-$$"
    mv "$PREFIX/bin/$t.tmp-$$" "$PREFIX/bin/$t"
    echo "built: $PREFIX/bin/$t"
  done
}
for t in "${TOOLS[@]}"; do
  [ -n "$t" ] || continue
  [ -x "$PREFIX/bin/$t" ] && continue
  echo "building $t (-j$JOBS) ..."
  cmake --build "$BUILD" --config Release -j "$JOBS" --target "$t" \
    >>"$PREFIX/cmake-build.log" 2>&1 || {
      tail -30 "$PREFIX/cmake-build.log" >&2
      echo "error: building $t failed; full log: $PREFIX/cmake-build.log" >&2
      exit 1
    }
  install_tools "$t"
done
echo "llama.cpp from llama-cpp-python $VERSION (vendor/llama.cpp); tools: ${TOOLS[*]}" >"$PREFIX/VERSION"
"$PREFIX/bin/llama-perplexity" --version >>"$PREFIX/VERSION" 2>&1 || true
cat "$PREFIX/VERSION"
