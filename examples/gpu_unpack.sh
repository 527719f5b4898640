#!/usr/bin/env bash
# On a device machine: keeps the carried part of examples/gpu_pack.sh's bundle, and once every
# part is there, unpacks it (the quickstart's GGUF, tokenizer and data under runs/quickstart,
# the libtorch build under runs/gpu-bin with a wrapper that finds the machine's libtorch).
# Exits 0 with a count while parts are missing; 1 when the parts do not add up.
set -euo pipefail
cd "$(dirname "$0")/.."
K=runs/gpu-keep
mkdir -p $K
[ -f .gpu/manifest ] && cp .gpu/manifest $K/
for p in .gpu/part-*; do
  [ -f "$p" ] && cp "$p" $K/
done
[ -f $K/manifest ] || { echo "gpu_unpack: no .gpu/manifest carried (see examples/gpu_pack.sh)" >&2; exit 1; }
read -r count sha <$K/manifest
have=$(ls $K/part-* 2>/dev/null | wc -l)
echo "gpu_unpack: $have of $count parts in $K"
[ "$have" -ge "$count" ] || exit 0
if [ ! -x runs/gpu-bin/linly-lora-gpu ] || [ "$(cat runs/gpu-bin/.sha 2>/dev/null)" != "$sha" ]; then
  cat $K/part-* >$K/bundle.tar.xz
  got=$(sha256sum $K/bundle.tar.xz | cut -d' ' -f1)
  [ "$got" = "$sha" ] || { echo "gpu_unpack: the parts give sha256 $got, the manifest says $sha; pack and carry again" >&2; exit 1; }
  tar -xJf $K/bundle.tar.xz -C .
  rm $K/bundle.tar.xz
  TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  cat >runs/gpu-bin/linly-lora-gpu <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$TORCH_LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$PWD/runs/gpu-bin/linly-lora" "\$@"
WRAP
  chmod +x runs/gpu-bin/linly-lora-gpu
  echo "$sha" >runs/gpu-bin/.sha
fi
echo "gpu_unpack: ready (runs/gpu-bin/linly-lora-gpu)"
