#!/usr/bin/env bash
# The GPU check of scripts/gpu_check.py (at most 8 minutes on one GPU): prints one table, writes gpu_check.json.
# Any flag is passed on, e.g. --device cuda:1 or, on a CPU, --device cpu --tiny --precisions no --compile false.
set -euo pipefail
exec python "$(dirname "$0")/gpu_check.py" "$@"
