#!/usr/bin/env bash
# Start or stop the Ray processes of a cluster that `fedemb simulate --ray-address` runs on.
#
#   scripts/ray_cluster.sh head [PORT] [NUM_CPUS]     on the head machine (prints the address to use)
#   scripts/ray_cluster.sh worker HEAD:PORT [NUM_CPUS] on every other machine
#   scripts/ray_cluster.sh status                     resources the cluster offers
#   scripts/ray_cluster.sh stop                       on every machine, when done
#
# Every machine needs the same checkout at the same path, set up with scripts/setup.sh, and the
# run's data at the same path (each machine builds its own memory-mapped store of it).
# See docs/cluster.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ray="$root/.venv/bin/ray"
export RAY_USAGE_STATS_ENABLED=0 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
unset RAY_ADDRESS
cpus=()
case "${1:-}" in
  head)
    port="${2:-6379}"
    [ -n "${3:-}" ] && cpus=(--num-cpus "$3")
    "$ray" start --head --port "$port" --include-dashboard=false --disable-usage-stats "${cpus[@]}" >/dev/null
    echo "Ray head started; run with: fedemb simulate --ray-address $(hostname -I 2>/dev/null | awk '{print $1}'):$port ..."
    ;;
  worker)
    [ -n "${2:-}" ] || { echo "usage: $0 worker HEAD:PORT [NUM_CPUS]" >&2; exit 2; }
    [ -n "${3:-}" ] && cpus=(--num-cpus "$3")
    "$ray" start --address "$2" --disable-usage-stats "${cpus[@]}" >/dev/null
    echo "Ray worker joined $2"
    ;;
  status) "$ray" status ;;
  stop) "$ray" stop --force >/dev/null 2>&1 || true; echo "Ray stopped on this machine" ;;
  *) echo "usage: $0 head [PORT] [NUM_CPUS] | worker HEAD:PORT [NUM_CPUS] | status | stop" >&2; exit 2 ;;
esac
