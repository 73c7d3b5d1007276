#!/usr/bin/env bash
# One-node Slurm on this machine, then the Snakemake workflow through the Slurm executor.
#
#   scripts/slurm_local.sh [STATE_DIR]        (as root; Debian bookworm)
#
# Starts munged, a private MariaDB (for slurmdbd, so jobs are visible in `sacct`), slurmdbd,
# slurmctld and slurmd, all configured under STATE_DIR [/tmp/wsimil-slurm]; makes a tiny
# synthetic cohort there, runs pipelines/Snakefile with `--executor slurm`, checks that every
# job is in `sacct` and COMPLETED, and stops the daemons it started (also on failure).
# Needs: apt-get install slurm-wlm slurmdbd munge mariadb-server  (`make slurm-test` does it).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
STATE="$(realpath -m "${1:-/tmp/wsimil-slurm}")"
VENV="${VENV:-$REPO/.venv}"
N_SLIDES="${N_SLIDES:-6}"
HOST="$(hostname -s)"
NCPU="$(nproc)"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
for tool in slurmctld slurmd slurmdbd sacct sbatch munged mariadbd mariadb-install-db; do
  command -v "$tool" >/dev/null || { echo "slurm_local.sh: $tool not found; apt-get install slurm-wlm slurmdbd munge mariadb-server" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "slurm_local.sh: run as root (it starts system daemons)" >&2; exit 2; }

rm -rf "$STATE"; mkdir -p "$STATE"/{spool,state,log,munge,mysql}
PIDS=()
LINKS=()
stop_all() {
  # Stop only the daemons this script started, by their pid files / ids, newest first.
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do kill "${PIDS[$i]}" 2>/dev/null || true; done
  for f in "$STATE"/log/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  sleep 2
  for l in "${LINKS[@]}"; do rm -f "$l"; done
}
trap stop_all EXIT

# munge on its standard socket (the Slurm client tools look there); reuse a running one
MUNGE_SOCK=/run/munge/munge.socket.2
if ! munge -n -S "$MUNGE_SOCK" >/dev/null 2>&1; then
  mkdir -p /run/munge
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$STATE/munge/munge.key"
  munged --force --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCK" --num-threads=10 \
    --pid-file="$STATE/log/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
fi

# MariaDB for slurmdbd (private datadir, socket only)
SQL_SOCK="$STATE/mysql.sock"
mariadb-install-db --datadir="$STATE/mysql" --user=root --auth-root-authentication-method=socket >"$STATE/log/mysql-install.log" 2>&1
mariadbd --datadir="$STATE/mysql" --socket="$SQL_SOCK" --bind-address=127.0.0.1 --port=13306 --user=root \
  --pid-file="$STATE/log/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" &
PIDS+=($!)
for _ in $(seq 60); do mariadb --socket="$SQL_SOCK" -e 'select 1' >/dev/null 2>&1 && break; sleep 1; done
mariadb --socket="$SQL_SOCK" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'wsimil-local'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

cat >"$STATE/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=16819
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/log/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=13306
StorageUser=slurm
StoragePass=wsimil-local
StorageLoc=slurm_acct_db
CONF
chmod 600 "$STATE/slurmdbd.conf"

cat >"$STATE/slurm.conf" <<CONF
ClusterName=wsimil
SlurmctldHost=$HOST
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/log/slurmctld.pid
SlurmdPidFile=$STATE/log/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=16819
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
NodeName=$HOST CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# Job steps (srun inside a batch job) read /etc/slurm/slurm.conf, whatever SLURM_CONF says:
# link the config there for the run, and remove the links afterwards.
for f in slurm.conf slurmdbd.conf; do
  if [ -e "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" != "$STATE/$f" ]; then
    echo "slurm_local.sh: /etc/slurm/$f exists; this script does not replace a real cluster's config" >&2; exit 2
  fi
  mkdir -p /etc/slurm; ln -sfn "$STATE/$f" "/etc/slurm/$f"; LINKS+=("/etc/slurm/$f")
done
export SLURM_CONF="$STATE/slurm.conf"

slurmdbd
for _ in $(seq 30); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 1; done
sacctmgr -i add cluster wsimil >/dev/null
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 30); do [[ "$(sinfo -h -o %T 2>/dev/null)" == *idle* ]] && break; sleep 1; done
sinfo

# The cohort and the workflow through the Slurm executor.
RUN="$STATE/run"
"$VENV/bin/wsimil" synth "$RUN" --n-slides "$N_SLIDES" --size-px 1024 >/dev/null
export PATH="$VENV/bin:$PATH"
START=$(date +%s)
(cd "$STATE" && "$VENV/bin/snakemake" -s "$REPO/pipelines/Snakefile" --profile "$REPO/pipelines/profiles/slurm" \
  --default-resources slurm_partition=debug --set-resources embed:slurm_partition=debug train:slurm_partition=debug --jobs 8 \
  --group-components embed=3 --cores "$NCPU" --resources "mem_mb=$MEM_MB" \
  --config run_dir="$RUN" wsimil_config="$REPO/configs/demo.yaml" wsimil="$VENV/bin/wsimil" \
    embed_device=cpu "train_args=--epochs 5 --folds 3" \
    "resources={tile: {threads: 1, mem_mb: 1000, runtime: 30, gpus: 0}, embed: {threads: 1, mem_mb: 2000, runtime: 30, gpus: 0}, train: {threads: 1, mem_mb: 2000, runtime: 30, gpus: 0}, heatmap: {threads: 1, mem_mb: 1000, runtime: 30, gpus: 0}}")
echo "workflow through Slurm: $(( $(date +%s) - START )) s"
# The same cohort outputs the workflow test checks: every per-slide export, and cohort files
# covering every slide.
"$VENV/bin/python" - "$RUN" "$N_SLIDES" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
run, n = Path(sys.argv[1]), int(sys.argv[2])
ids = pd.read_csv(run / "manifest.csv").slide_id.tolist()
hm = run / "heatmaps" / "gated_attention"
for sid in ids:
    d = hm / "slides" / sid
    for f in (f"{sid}.png", f"{sid}.csv", f"{sid}.geojson", f"{sid}.heatmap.tiff", f"{sid}.html"):
        assert (d / f).stat().st_size > 0, d / f
    assert list((d / "top").glob("*.jpg")), d / "top"
    assert (run / "tiles" / f"{sid}.qc.png").is_file()
pred = pd.read_csv(hm / "predictions.csv")
assert len(ids) == n and sorted(pred.slide_id) == sorted(ids), pred.slide_id.tolist()
index = (hm / "index.html").read_text()
assert all(f'href="slides/{sid}/{sid}.html"' in index for sid in ids)
print(f"cohort outputs: {len(pred)} predictions, index links {len(ids)} slides,",
      json.loads((hm / "summary.json").read_text())["status"])
PY

echo "--- sacct"
sacct -X -S "$(date -d @"$START" +%Y-%m-%dT%H:%M:%S)" -o JobID,JobName%24,Partition,AllocCPUS,ReqMem,State,ExitCode,Elapsed | tee "$STATE/sacct.txt"
n_done=$(sacct -X -n -P -S "$(date -d @"$START" +%Y-%m-%dT%H:%M:%S)" -o State | grep -c COMPLETED || true)
n_bad=$(sacct -X -n -P -S "$(date -d @"$START" +%Y-%m-%dT%H:%M:%S)" -o State | grep -vc COMPLETED || true)
echo "sacct: $n_done job(s) COMPLETED, $n_bad other"
[ "$n_done" -gt 0 ] && [ "$n_bad" -eq 0 ]
