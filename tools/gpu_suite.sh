#!/usr/bin/env bash
# The GPU checks in one call on a CUDA machine (issue 8): the CUDA tests, then every chapter's `full`-scale
# training step with its peak memory. Writes device.txt, pytest.log, full_scale.jsonl and full_scale.md under $OUT.
# On a machine without the package's dependencies, put their wheels in .whl/ first (bench/RESULTS.md lists them).
set -u
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SPEECHLLM_SCALE=smoke SPEECHLLM_CUDA_REPORT="$OUT/full_scale.jsonl"
rm -f "$SPEECHLLM_CUDA_REPORT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers, datasets, peft, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/device.txt"
python3 -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider --durations=0 -o junit_family=xunit2 --junitxml="$OUT/pytest.xml" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
python3 -c "
import json, sys; sys.path.insert(0, 'tests')
from full_scale import markdown_table
rows = [json.loads(l) for l in open('$SPEECHLLM_CUDA_REPORT')]
print(markdown_table(rows))" 2>&1 | tee "$OUT/full_scale.md"
exit $status
