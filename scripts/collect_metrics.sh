#!/usr/bin/env bash
# Samples CPU utilisation, RSS and (through NVML, where a GPU exists) GPU utilisation and memory every
# second into DIR/system_metrics.jsonl; `aift report` plots them.
#
#   scripts/collect_metrics.sh results/current/ -- aift train --config cfg.yaml   # until the command ends
#   scripts/collect_metrics.sh results/current/ --pid 1234                       # until pid 1234 ends or killed
#   scripts/collect_metrics.sh results/current/ &  ...  kill %1                   # machine-wide, until killed
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -ge 1 ] && exit 0 || exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/../.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
# exec: the sampler receives SIGTERM/SIGINT itself and stops cleanly after a last sample.
exec "$python" -m aift.utils.system_metrics "$@"
