#!/usr/bin/env bash
# Build docker/Dockerfile with podman here (no Docker engine, no registry access) and run a tiny
# cohort inside the image.
#
#   docker/build_test.sh [WORK_DIR]          (as root; Debian bookworm host; ~15 GB of disk)
#
# No base image can be pulled, so the test base is made locally: debootstrap bookworm + python3
# + pip, plus the CUDA build of torch and torchvision with every package they depend on (the
# nvidia-* CUDA libraries included) copied file by file, from each distribution's RECORD, out of
# this checkout's .venv. That is what a CUDA PyTorch base image holds. It is imported with
# `podman import` and passed as BASE_IMAGE; pip inside the build reaches PyPI for the rest.
#
# Podman runs with runc, chroot isolation for the build (docker format, so SHELL applies) and its
# own overlay store under WORK_DIR.
# Containers get explicit ulimits: podman's defaults raise the open-files and processes hard
# limits, which needs CAP_SYS_RESOURCE, and sandboxed CI machines often lack it.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(realpath -m "${1:-/tmp/wsimil-docker-test}")"
VENV="${VENV:-$REPO/.venv}"
BASE=localhost/wsimil-testbase:bookworm
IMAGE=localhost/wsimil:test
for tool in podman debootstrap runc; do
  command -v "$tool" >/dev/null || { echo "build_test.sh: $tool not found; apt-get install podman buildah runc debootstrap" >&2; exit 2; }
done
[ -x "$VENV/bin/python" ] || { echo "build_test.sh: no $VENV; run 'make setup' first" >&2; exit 2; }
mkdir -p "$WORK"
PODMAN=(podman --root "$WORK/storage" --runroot "$WORK/run-state" --runtime runc --storage-driver overlay)
RUN=("${PODMAN[@]}" run --rm --ulimit nofile=16384:16384 --ulimit nproc=16384:16384)

if ! "${PODMAN[@]}" image exists "$BASE"; then
  ROOTFS="$WORK/rootfs"
  rm -rf "$ROOTFS"
  echo "debootstrap bookworm -> $ROOTFS (log: $WORK/debootstrap.log)"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,passwd \
    bookworm "$ROOTFS" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1
  # torch + torchvision and their whole dependency closure, as installed in the venv
  "$VENV/bin/python" - "$ROOTFS/usr/local/lib/python3.11/dist-packages" <<'PY'
import shutil, sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

dest = Path(sys.argv[1])
todo, seen = [Requirement("torch"), Requirement("torchvision")], set()
while todo:
    req = todo.pop()
    key = (req.name.lower().replace("_", "-"), frozenset(req.extras))
    if key in seen:
        continue
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        continue  # an optional dependency that is not installed
    seen.add(key)
    for r in map(Requirement, dist.requires or []):  # requirements, with those of the extras asked for
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in req.extras or {""}):
            todo.append(r)
    for f in dist.files or []:
        src = Path(dist.locate_file(f))
        if src.is_file() and ".." not in f.parts:
            out = dest / f
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
seen = {name for name, _ in seen}
print(f"copied {len(seen)} distributions: {', '.join(sorted(seen))}")
PY
  rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED   # a base image's pip installs system-wide
  tar -C "$ROOTFS" -c . | "${PODMAN[@]}" import - "$BASE"
  rm -rf "$ROOTFS"
fi

# This network reaches PyPI through a TLS proxy: give the test base the host's CA bundle.
CTX="$WORK/ca"; mkdir -p "$CTX"; cp /etc/ssl/certs/ca-certificates.crt "$CTX/"
printf 'FROM %s\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n' "$BASE" >"$CTX/Containerfile"
"${PODMAN[@]}" build --isolation chroot -t "$BASE-ca" "$CTX"

START=$(date +%s)
"${PODMAN[@]}" build --format docker --isolation chroot --network host -f "$REPO/docker/Dockerfile" \
  --build-arg BASE_IMAGE="$BASE-ca" -t "$IMAGE" "$REPO"
echo "build: $(( $(date +%s) - START )) s"
echo "image: $("${PODMAN[@]}" image ls "$IMAGE" --format '{{.Size}}')  base: $("${PODMAN[@]}" image ls "$BASE" --format '{{.Size}}')"
# Capture first: 'history | head' would kill podman with SIGPIPE, fatal under pipefail.
layers=$("${PODMAN[@]}" history "$IMAGE" --format '{{.Size}}\t{{.CreatedBy}}')
sed -n '1,8p' <<<"$layers" | cut -c1-150

"${RUN[@]}" "$IMAGE" --help
# What the workflow's Kubernetes jobs need in the image: snakemake + the fs storage plugin, rsync,
# and a /workdir the non-root user can write.
"${RUN[@]}" --entrypoint bash "$IMAGE" -c 'python3 -m snakemake --version && python3 -c "import snakemake_storage_plugin_fs" && rsync --version | head -n1 && touch /workdir/.w && echo "workflow tools: OK"'
rm -rf "$WORK/out"; mkdir -p "$WORK/out"; chmod 777 "$WORK/out"
"${RUN[@]}" -v "$WORK/out:/runs" "$IMAGE" demo --out /runs/demo --n-slides 6 --size-px 4096
ls "$WORK"/out/demo/models/*/card.json "$WORK"/out/demo/external/predictions/*/predictions.csv \
  "$WORK"/out/demo/external/heatmaps/*/slides/*/*.png "$WORK"/out/demo/external/heatmaps/*/index.html
echo "build_test.sh: OK"
