#!/usr/bin/env bash
# Build docker/Dockerfile with podman here (no Docker engine, no registry access) and run a tiny
# cohort inside the image.
#
#   docker/build_test.sh [WORK_DIR]          (as root; Debian bookworm host)
#
# No base image can be pulled, so the test base is made locally: debootstrap bookworm + python3
# + pip, plus torch and torchvision copied from this checkout's .venv (the CPU pair that works
# here; PyPI's default torch wheel is a multi-GB CUDA build). That base is imported with
# `podman import` and passed as BASE_IMAGE, which is what a CUDA PyTorch base provides on GPU
# nodes. pip inside the build reaches PyPI for the other pinned dependencies.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(realpath -m "${1:-/tmp/wsimil-docker-test}")"
VENV="${VENV:-$REPO/.venv}"
BASE=localhost/wsimil-testbase:bookworm
IMAGE=localhost/wsimil:test
for tool in podman debootstrap runc; do
  command -v "$tool" >/dev/null || { echo "build_test.sh: $tool not found; apt-get install podman buildah runc debootstrap" >&2; exit 2; }
done
PODMAN=(podman --runtime runc --storage-driver vfs)
mkdir -p "$WORK"

if ! "${PODMAN[@]}" image exists "$BASE"; then
  ROOTFS="$WORK/rootfs"
  rm -rf "$ROOTFS"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,passwd \
    bookworm "$ROOTFS" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1
  # torch + torchvision (and their own dependencies) from the local venv, as a CUDA base has them
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  DEST="$ROOTFS/usr/local/lib/python3.11/dist-packages"
  mkdir -p "$DEST"
  for pkg in torch torchvision functorch torchgen sympy mpmath networkx jinja2 markupsafe filelock fsspec typing_extensions numpy numpy.libs pillow pillow.libs PIL; do
    for d in "$SITE"/$pkg "$SITE"/$pkg-*.dist-info "$SITE"/${pkg}*.libs; do [ -e "$d" ] && cp -a "$d" "$DEST/"; done
  done
  cp -a "$SITE"/typing_extensions.py "$DEST/" 2>/dev/null || true
  rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED   # a base image's pip installs system-wide
  tar -C "$ROOTFS" -c . | "${PODMAN[@]}" import - "$BASE"
  rm -rf "$ROOTFS"
fi

# This network reaches PyPI through a TLS proxy: give the test base the host's CA bundle.
CTX="$WORK/ca"; mkdir -p "$CTX"; cp /etc/ssl/certs/ca-certificates.crt "$CTX/"
printf 'FROM %s\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n' "$BASE" >"$CTX/Containerfile"
"${PODMAN[@]}" build --isolation chroot -t "$BASE-ca" "$CTX"

START=$(date +%s)
"${PODMAN[@]}" build --isolation chroot --network host -f "$REPO/docker/Dockerfile" \
  --build-arg BASE_IMAGE="$BASE-ca" -t "$IMAGE" "$REPO"
echo "build: $(( $(date +%s) - START )) s"
"${PODMAN[@]}" image ls "$IMAGE" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
echo "base: $("${PODMAN[@]}" image ls "$BASE" --format '{{.Size}}')"

"${PODMAN[@]}" run --rm "$IMAGE" --help
rm -rf "$WORK/run"; mkdir -p "$WORK/run"; chmod 777 "$WORK/run"
"${PODMAN[@]}" run --rm -v "$WORK/run:/runs" "$IMAGE" synth /runs/cohort --n-slides 6 --size-px 1024
"${PODMAN[@]}" run --rm -v "$WORK/run:/runs" -v "$REPO/configs:/configs:ro" "$IMAGE" demo --out /runs/demo --n-slides 6 --size-px 1024
ls "$WORK"/run/demo/heatmaps/*/*.png
