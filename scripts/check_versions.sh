#!/usr/bin/env bash
# The lower end of the supported range: a virtual environment with the oldest PEFT and transformers that
# pyproject.toml allows, then the test files that exercise PEFT and transformers (the newest versions are what
# scripts/setup.sh installs, which README's test command covers).
#   bash scripts/check_versions.sh [VENV_DIR [TEST ...]]
# VENV_DIR defaults to /tmp/mftc-lower-bounds (reused when present); TESTs (pytest arguments) replace the list below.
# PEFT_VERSION, TRANSFORMERS_VERSION, TOKENIZERS_VERSION and HUB_VERSION override the pins (e.g. to try a middle
# version). torch comes from the interpreter that runs this script (--system-site-packages): no torch wheel is ever
# downloaded. The pins go in with --no-deps, so the script then checks that every requirement of this package, PEFT,
# transformers, tokenizers and huggingface-hub holds for the versions that get imported.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/mftc-lower-bounds}"
PEFT_VERSION="${PEFT_VERSION:-0.18.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-4.54.0}"
# What that transformers release needs of its own dependencies (the interpreter's are newer).
TOKENIZERS_VERSION="${TOKENIZERS_VERSION:-0.21.4}"
HUB_VERSION="${HUB_VERSION:-0.36.2}"
PINS=("peft==$PEFT_VERSION" "transformers==$TRANSFORMERS_VERSION" "tokenizers==$TOKENIZERS_VERSION"
      "huggingface-hub==$HUB_VERSION")
TESTS=(
  tests/test_compat.py tests/test_adapter.py tests/test_loading.py tests/test_precision.py tests/test_errors.py
  tests/test_bad_inputs.py tests/test_state.py tests/test_hot_path.py tests/test_step_control.py
  tests/test_dynamic.py tests/test_warmup.py tests/test_checkpointing.py tests/test_trainer.py
  tests/test_distributed.py tests/test_accelerate.py
)
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# No pip or setuptools of its own: the interpreter's (newer) ones, seen through --system-site-packages, do the installs.
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages --without-pip "$VENV"
"$VENV/bin/python" -m pip install -q --no-deps "${PINS[@]}"
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONPATH="$PWD"  # this checkout, whatever else has the package installed

echo "== versions in $VENV"
"$VENV/bin/python" - "$PEFT_VERSION" "$TRANSFORMERS_VERSION" "$PWD" <<'PY'
import sys
from importlib import metadata
from pathlib import Path

import peft, torch, transformers
from packaging.requirements import Requirement
import mftc_peft

print(f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}")
print(f"mftc_peft from {Path(mftc_peft.__file__).parent}")
want = {"peft": sys.argv[1], "transformers": sys.argv[2]}
got = {"peft": peft.__version__, "transformers": transformers.__version__}
if got != want or not Path(mftc_peft.__file__).is_relative_to(sys.argv[3]):
    sys.exit(f"the environment does not load what was pinned: {got} (wanted {want}), mftc_peft {mftc_peft.__file__}")
# --no-deps installs check nothing: every requirement of these distributions must hold for what gets imported.
unmet = []
for name in ("mftc-peft", "peft", "transformers", "tokenizers", "huggingface-hub"):
    for line in metadata.requires(name) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or not req.specifier.contains(installed, prereleases=True):
            unmet.append(f"{name} needs {req}, found {installed}")
if unmet:
    sys.exit("unmet requirements:\n  " + "\n  ".join(unmet))
PY

[ $# -le 1 ] || TESTS=("${@:2}")
echo "== ${#TESTS[@]} test files"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
