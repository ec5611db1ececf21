#!/usr/bin/env bash
# Run the test suite (the README's test command) from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest tests -q "$@"
