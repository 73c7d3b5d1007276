#!/usr/bin/env bash
# Stand-in for Kubernetes pods, for Snakemake's cluster-generic executor: each job runs in a
# fresh, empty folder with no view of the workflow's working directory, so it gets its sources
# and inputs only through the storage plugin (and the manifest and slides from their absolute
# paths, as from a volume every pod mounts).
#   --cluster-generic-submit-cmd "bash pod_submit.sh"         prints the job's folder as its id
#   --cluster-generic-status-cmd "bash pod_submit.sh --status"  running | success | failed
set -euo pipefail
if [ "$1" = "--status" ]; then
  if [ ! -f "$2/exit_code" ]; then echo running
  elif [ "$(cat "$2/exit_code")" = 0 ]; then echo success
  else echo failed; fi
  exit 0
fi
pod="$(mktemp -d "${WSIMIL_POD_ROOT:-${TMPDIR:-/tmp}}/pod.XXXXXX")"
cp "$1" "$pod/jobscript.sh"
# The pod runs detached from this script's stdout: Snakemake reads the job id from it until it
# closes, so a pod holding it open would make every submission wait for the job to end.
(cd "$pod" && rc=0 && { bash jobscript.sh >job.log 2>&1 </dev/null || rc=$?; } && echo "$rc" >exit_code) \
  </dev/null >/dev/null 2>&1 &
echo "$pod"
