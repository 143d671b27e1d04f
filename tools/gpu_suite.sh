#!/usr/bin/env bash
# The GPU checks in one call on a CUDA machine (issue 8): the CUDA tests with every chapter's `full`-scale training
# step and its peak memory ("pytest"), then every notebook at smoke scale on the GPU with its `cuda`-flagged cells
# ("notebooks": nbdev_test --flags cuda, which builds the smoke corpus first), then the full-scale cases' peak memory
# in float32, as a GPU without bf16 (Colab's T4) trains them ("fp32"). GPU_SUITE_PARTS picks and orders them
# (default "pytest notebooks fp32"). Writes device.txt, pytest.log, full_scale.jsonl, full_scale.md, nbdev_test.log,
# full_scale_fp32.jsonl and full_scale_fp32.md under $OUT.
# On a machine without the package's dependencies, put their wheels in .whl/ first (bench/RESULTS.md lists them).
set -u
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SPEECHLLM_SCALE=smoke SPEECHLLM_CUDA_REPORT="$OUT/full_scale.jsonl"
rm -f "$SPEECHLLM_CUDA_REPORT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers, datasets, peft, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/device.txt"
status=0
run_pytest() {
  python3 -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider --durations=0 -o junit_family=xunit2 --junitxml="$OUT/pytest.xml" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log"
  local rc=${PIPESTATUS[0]}
  python3 -c "
import json, sys; sys.path.insert(0, 'tests')
from full_scale import markdown_table
rows = [json.loads(l) for l in open('$SPEECHLLM_CUDA_REPORT')]
print(markdown_table(rows))" 2>&1 | tee "$OUT/full_scale.md"
  return $rc
}
run_notebooks() {
  # one worker per 2 cores, at most 8: the GPU is shared, each worker holds its own CUDA context
  local workers=${NB_WORKERS:-$(python3 -c "import os; print(max(1, min(8, (os.cpu_count() or 2) // 2)))")}
  echo "nbdev_test --flags cuda: $workers workers x 2 torch threads" | tee "$OUT/nbdev_test.log"
  # keyword arguments, not command-line flags: under `python -c`, fastcore's call_parse finds no calling module,
  # ignores sys.argv and would run with the defaults (no --flags cuda: the cuda-flagged cells silently skipped)
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python3 -c "from nbdev.test import nbdev_test; nbdev_test(flags='cuda', n_workers=$workers, timing=True)" \
    2>&1 | tee -a "$OUT/nbdev_test.log"
  local rc=${PIPESTATUS[0]}
  # --timing's per-notebook lines show the arguments reached nbdev_test
  [ $rc -ne 0 ] || grep -q "ipynb: [0-9]* secs" "$OUT/nbdev_test.log" || { echo "nbdev_test ran without its arguments (no timing lines)" >&2; rc=1; }
  return $rc
}
run_fp32() {
  # one warm-up and two timed steps per case: the peak is what is wanted, the step times are not a T4's
  SPEECHLLM_MIXED_PRECISION=no SPEECHLLM_CUDA_REPORT="$OUT/full_scale_fp32.jsonl" python3 tests/full_scale.py --steps 2 --warmup 1 \
    --budget-gib "$(python3 -c "import sys; sys.path.insert(0, 'tests'); from full_scale import T4_BUDGET_GIB; print(T4_BUDGET_GIB)")" \
    > "$OUT/full_scale_fp32.md" 2>&1
  local rc=$?
  tail -n 41 "$OUT/full_scale_fp32.md"
  return $rc
}
for part in ${GPU_SUITE_PARTS:-pytest notebooks fp32}; do
  case $part in
    pytest) run_pytest || status=1 ;;
    notebooks) run_notebooks || status=1 ;;
    fp32) rm -f "$OUT/full_scale_fp32.jsonl"; run_fp32 || status=1 ;;
    *) echo "GPU_SUITE_PARTS: expected some of 'pytest', 'notebooks' and 'fp32', got '$part'" >&2; exit 2 ;;
  esac
done
exit $status
