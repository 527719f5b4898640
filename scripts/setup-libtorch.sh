#!/usr/bin/env bash
# Builds linly-lora with the libtorch (GPU) backend.
#
#   scripts/setup-libtorch.sh [VENV_DIR]        (default: .venv-torch)
#
# Makes a venv with torch from PyPI (2.11.0 by default: the CUDA 13 build; ~2.6 GB download,
# ~4.6 GB installed), builds `cargo build --release --features tch` against it (torch-sys
# compiles its C++ wrapper against the venv's headers), and writes target/tch/linly-lora-gpu, a
# wrapper that sets LD_LIBRARY_PATH to the venv's torch/lib so nobody has to by hand.
#
# Supported torch versions: 2.11.0 (built and run here; tch 0.22 targets 2.9.0, the version
# check is bypassed). Override with TORCH_VERSION=2.9.0 etc.
#
# To run on another machine (e.g. a GPU host without registries) copy target/tch/release/
# linly-lora and start it with LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
# against the same torch version.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-torch}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
fi
TORCH_LIB=$("$VENV/bin/python" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
# shellcheck disable=SC1091
source "$VENV/bin/activate"
LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR=target/tch \
  cargo build --release --features tch
cat > target/tch/linly-lora-gpu <<WRAP
#!/usr/bin/env bash
# linly-lora with the libtorch backend; finds libtorch in $TORCH_LIB.
export LD_LIBRARY_PATH="$TORCH_LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$(pwd)/target/tch/release/linly-lora" "\$@"
WRAP
chmod +x target/tch/linly-lora-gpu
echo "built: target/tch/linly-lora-gpu (e.g. target/tch/linly-lora-gpu generate --device cuda:0 ...)"
