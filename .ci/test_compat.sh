#!/usr/bin/env bash
# The decoder engine (and AdaGate) on older transformers: one cached side venv per
# version next to .venv (.venv-tf<version>), then the engine tests there.
#   usage: test_compat.sh   (env: PYTHON, COMPAT_VERSIONS, TORCH_SPEC, TORCH_INDEX)
# A venv is built once (stamp .venv-tf<v>/.holoprune-compat); the project is
# installed editable without dependencies, so later runs see the current code.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
COMPAT_VERSIONS="${COMPAT_VERSIONS:-4.37.2 4.49.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

tests=(tests/engine)
for f in tests/threed/test_adagate*.py; do
    [ -e "$f" ] && tests+=("$f")
done

status=0
summary=()
for v in $COMPAT_VERSIONS; do
    venv=".venv-tf$v"
    py="$venv/bin/python"
    if [ ! -f "$venv/.holoprune-compat" ]; then
        echo "test-compat: building $venv (transformers==$v)"
        test -x "$py" || "$PYTHON" -m venv "$venv"
        "$py" -m pip install --quiet --upgrade pip
        "$py" -c "import torch" 2>/dev/null ||
            TORCH_SPEC="$TORCH_SPEC" TORCH_RECORD="$venv/.torch-index" bash .ci/install_torch.sh "$py"
        # pip picks the tokenizers release that this transformers pins
        # matplotlib: the AdaGate calibration plots
        "$py" -m pip install --quiet "transformers==$v" "pytest>=8,<10" numpy einops tqdm matplotlib
        "$py" -m pip install --quiet --no-deps -e .
        touch "$venv/.holoprune-compat"
    fi
    echo "test-compat: transformers $v: ${tests[*]}"
    if OMP_NUM_THREADS=1 "$py" -m pytest -q -p no:cacheprovider "${tests[@]}"; then
        summary+=("transformers $v: passed")
    else
        summary+=("transformers $v: FAILED")
        status=1
    fi
done
printf 'test-compat: %s\n' "${summary[@]}"
exit $status
