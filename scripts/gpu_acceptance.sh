#!/usr/bin/env bash
# The GPU acceptance run on one H100 / H200 with a stock PyTorch image, offline (docs/performance.md,
# "GPU acceptance run"). Installs the wheels of scripts/gpu_wheels.sh into a private folder (nothing
# the image already has is replaced), then runs scripts/gpu_acceptance.py: results.json,
# results.md and log.txt in OUT; exit status non-zero when a check failed.
#
#   scripts/gpu_acceptance.sh OUT [WHEELS] [-- extra arguments of gpu_acceptance.py]
#
# WHEELS defaults to .gpu-wheels. The whole run fits in 8 minutes: the installation, then the parts
# within --budget-s (450 s by default; parts left after it are reported as skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_acceptance.sh OUT [WHEELS] [-- args]}
shift
WHEELS=.gpu-wheels
if [ $# -gt 0 ] && [ "$1" != "--" ]; then WHEELS=$1; shift; fi
[ "${1:-}" = "--" ] && shift
PY=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/nld-gpu-site}
mkdir -p "$OUT"

# each wheel whose distribution the image lacks; those it has (any version) are kept as they are
missing=$("$PY" - "$WHEELS" <<'PY'
import sys
from importlib import metadata
from pathlib import Path
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
if not wheels:
    sys.exit(f"error: no wheels in {sys.argv[1]} (run scripts/gpu_wheels.sh on a machine with network)")
for w in wheels:
    name = w.name.split("-")[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(w)
PY
) || exit 2
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $missing \
        || { echo "error: installing the wheels failed" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "installed into $SITE: $(echo $missing | xargs -n1 basename 2>/dev/null | tr '\n' ' ')"
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_acceptance.py --out "$OUT" "$@"
