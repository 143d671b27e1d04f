#!/usr/bin/env bash
# The package's requirement floors (settings.ini `requirements`), tested: a separate venv gets the LOWEST version of
# every direct requirement that the ranges allow (uv's lowest-direct resolution), builds its own smoke-scale artifacts
# with them, and runs the test suite. A floor that fails here is a floor we do not support: raise it in settings.ini.
#
#   make test-lowest                       # or: bash tools/test_lowest.sh
#   LOWEST_DIR=/tmp/x bash tools/test_lowest.sh -k sft   # extra arguments go to pytest
#
# Needs PyPI (uv is installed from it, into LOWEST_DIR). Not part of `make test`: the lowest torch alone is a
# multi-GB download.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${LOWEST_DIR:-/tmp/speechllm-lowest}
py=${PYTHON:-python3}
mkdir -p "$dir"
[ -x "$dir/uv/bin/uv" ] || { "$py" -m venv "$dir/uv" && "$dir/uv/bin/pip" install -q uv; }
uv="$dir/uv/bin/uv"
[ -x "$dir/venv/bin/python" ] || "$uv" venv -q "$dir/venv" --python "$py"
# pyarrow comes in through datasets, unpinned: its newest wheels need numpy 2, which the numpy floor is not, and
# pyarrow's metadata does not say so, so the resolver cannot see the clash. 17 is the last pyarrow built for numpy 1.
echo "pyarrow==17.0.0" > "$dir/overrides.txt"
"$uv" pip install -q --python "$dir/venv/bin/python" --resolution lowest-direct --override "$dir/overrides.txt" \
    -e . "pytest>=8" "scikit-learn>=1.3"
# the runner's own tools (tests/test_course_report.py), at their current versions: they are not package requirements
"$uv" pip install -q --python "$dir/venv/bin/python" "nbformat>=5.10" "nbclient>=0.10" "ipykernel>=6" "jupyter_client>=8"
echo "lowest versions under test:"
"$uv" pip list -q --python "$dir/venv/bin/python" 2>/dev/null \
    | grep -iE '^(numpy|scipy|torch|torchaudio|transformers|tokenizers|peft|datasets|accelerate|matplotlib|ipywidgets|ipython|soundfile|tqdm|filelock|espeakng-loader|pandas) ' \
    | awk '{printf "  %s==%s\n", $1, $2}'
mkdir -p "$dir/data"
SPEECHLLM_DATA="$dir/data" SPEECHLLM_SCALE=smoke OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
    "$dir/venv/bin/python" -m pytest tests/ -q -p no:cacheprovider "$@"
