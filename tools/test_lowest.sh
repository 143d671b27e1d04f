#!/usr/bin/env bash
# The package's requirement floors (settings.ini `requirements`), tested: a separate venv gets the LOWEST version of
# every direct requirement that the ranges allow (uv's lowest-direct resolution), builds its own smoke-scale artifacts
# with them, and runs the tests and every notebook. A floor that fails here is a floor we do not support: raise it.
#
#   make test-lowest                                # or: bash tools/test_lowest.sh
#   LOWEST_MODE=old-torch bash tools/test_lowest.sh # torch/torchaudio at their floor, everything else newest: what
#                                                   # `pip install` gives a machine whose old torch it keeps
#   LOWEST_PARTS=pytest bash tools/test_lowest.sh -k sft   # only the tests (extra arguments go to pytest)
#
# Needs PyPI (uv is installed from it, into LOWEST_DIR). Not part of `make test`: torch alone is a multi-GB download.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${LOWEST_MODE:-lowest}
parts=${LOWEST_PARTS:-pytest notebooks}
dir=${LOWEST_DIR:-/tmp/speechllm-$mode}
py=${PYTHON:-python3}
mkdir -p "$dir"
[ -x "$dir/uv/bin/uv" ] || { "$py" -m venv "$dir/uv" && "$dir/uv/bin/pip" install -q uv; }
uv="$dir/uv/bin/uv"
[ -x "$dir/venv/bin/python" ] || "$uv" venv -q "$dir/venv" --python "$py"
floor() { grep '^requirements' settings.ini | tr ' ' '\n' | sed -n "s/^$1>=//p"; }
case "$mode" in
  lowest)
    # pyarrow comes in through datasets, unpinned: its newest wheels need numpy 2, which the numpy floor is not, and
    # pyarrow's metadata does not say so, so the resolver cannot see the clash. 17 is the last pyarrow for numpy 1.
    echo "pyarrow==17.0.0" > "$dir/overrides.txt"
    resolution=(--resolution lowest-direct --override "$dir/overrides.txt") ;;
  old-torch)
    printf 'torch==%s.0\ntorchaudio==%s.0\n' "$(floor torch)" "$(floor torchaudio)" > "$dir/overrides.txt"
    resolution=(--override "$dir/overrides.txt") ;;
  *) echo "LOWEST_MODE: expected 'lowest' or 'old-torch', got '$mode'" >&2; exit 2 ;;
esac
"$uv" pip install -q --python "$dir/venv/bin/python" "${resolution[@]}" -e . "pytest>=8" "scikit-learn>=1.3"
"$uv" pip freeze -q --python "$dir/venv/bin/python" 2>/dev/null | grep -v '^-e\|speechllm' > "$dir/frozen.txt"
# the test tools, at the versions the repo pins, kept from moving what is under test
"$uv" pip install -q --python "$dir/venv/bin/python" -c "$dir/frozen.txt" "nbformat>=5.10" "nbclient>=0.10" \
    "ipykernel>=6" "jupyter_client>=8" nbdev==2.4.14 fastcore==1.12.47 execnb==0.1.18
echo "$mode versions under test:"
"$uv" pip list -q --python "$dir/venv/bin/python" 2>/dev/null \
    | grep -iE '^(numpy|scipy|torch|torchaudio|transformers|tokenizers|peft|datasets|accelerate|matplotlib|ipywidgets|ipython|soundfile|tqdm|filelock|espeakng-loader|pandas) ' \
    | awk '{printf "  %s==%s\n", $1, $2}'
mkdir -p "$dir/data"
export SPEECHLLM_DATA="$dir/data" SPEECHLLM_SCALE=smoke OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
if [[ " $parts " == *" notebooks "* ]]; then
  "$dir/venv/bin/nbdev_test" --n_workers 2 --timing || status=1
fi
if [[ " $parts " == *" pytest "* ]]; then
  "$dir/venv/bin/python" -m pytest tests/ -q -p no:cacheprovider "$@" || status=1
fi
exit $status
