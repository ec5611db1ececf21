#!/usr/bin/env bash
# Run defenses over record folders (see sh/batch.py --help):  bash sh/batch.sh --defenses ulrl ft
set -euo pipefail
cd "$(dirname "$0")/.."
exec python sh/batch.py "$@"
