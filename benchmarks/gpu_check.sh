#!/usr/bin/env bash
# The GPU check, one prepared script for the few minutes a GPU is lent: on a CUDA machine it runs, within
# 8 minutes, the tests marked `cuda` (python -m pytest -m cuda) and the GPU benchmarks of benchmarks/README.md,
# and writes JSON lines (results.jsonl: one object per step, with the benchmark's own JSON record) and a
# summary (summary.txt) to one folder: $OUT if set, else a temporary folder it names. Without CUDA it says so
# and exits 0. Run it from anywhere:
#
#     bash benchmarks/gpu_check.sh            # or: OUT=/some/folder bash benchmarks/gpu_check.sh
#
# BUDGET_S (default 480) is the whole run's limit; a step that would start with less than a minute left is
# skipped and says so. PYTHON (default: python) is the interpreter.
set -u
cd "$(dirname "$0")/.."
ROOT="$PWD"
DIR="${OUT:-$(mktemp -d -t eapcore-gpu-check-XXXXXX)}"
mkdir -p "$DIR"
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-480}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
RESULTS="$DIR/results.jsonl"
: > "$RESULTS"
START=$(date +%s)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no GPU found (torch.cuda.is_available() is False on $(hostname)); the cuda tests and GPU" \
         "benchmarks were skipped" | tee "$DIR/summary.txt"
    echo '{"step": "cuda", "gpu": false, "skipped": true}' >> "$RESULTS"
    echo "gpu_check: wrote $DIR"
    exit 0
fi
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" \
    > "$DIR/device.txt" 2>&1
nvidia-smi > "$DIR/nvidia-smi.txt" 2>&1 || true

# step NAME COMMAND...: runs with the time that is left (at most 300 s), keeps its output in NAME.log, and appends
# one JSON line: the step, its exit status, its seconds and, for a benchmark, the JSON object it printed last.
step() {
    local name="$1"; shift
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 60 )); then
        echo "{\"step\": \"$name\", \"skipped\": \"less than a minute of the ${BUDGET_S}s budget left\"}" >> "$RESULTS"
        return
    fi
    local limit=$(( left < 300 ? left : 300 ))
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$DIR/$name.log" 2>&1
    local rc=$?
    "$PY" - "$name" "$rc" "$(( $(date +%s) - t0 ))" "$DIR/$name.log" >> "$RESULTS" <<'EOF'
import json, sys
name, rc, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines = [l for l in open(log, errors="replace").read().splitlines() if l.strip()]
record = {"step": name, "rc": rc, "seconds": seconds, "timed_out": rc in (124, 137)}
try:
    record["result"] = json.loads(lines[-1])
except (IndexError, ValueError):
    record["tail"] = lines[-3:]
print(json.dumps(record))
EOF
}

step pytest_cuda "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
step attribution_eap_ig_inputs "$PY" benchmarks/bench_attribution.py --model gpt2-small --n 256 --length 20 \
    --batch-size 32 --steps 5 --repeats 5
step evaluate_demo "$PY" benchmarks/bench_evaluate.py --model demo --data ioi --n 256 --repeats 20
step evaluate_gpt2_small "$PY" benchmarks/bench_evaluate.py --model gpt2-small --data random --n 256 --length 20 \
    --scores EAP --repeats 10
step attribution_eap_ig_activations "$PY" benchmarks/bench_attribution.py --model gpt2-small --n 32 --length 16 \
    --batch-size 32 --steps 5 --method EAP-IG-activations --repeats 3
step exact_demo "$PY" benchmarks/bench_attribution.py --model demo --data ioi --n 256 --batch-size 128 \
    --method exact --repeats 3

"$PY" - "$RESULTS" > "$DIR/summary.txt" <<'EOF'
import json, sys
keys = ("ratio", "mem_ratio", "cpu_ratio", "over_edge", "removals_per_s", "move_ms", "step_ms", "curve_ms",
        "forward_ms", "move_over_forward", "step_over_forward", "machine")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "skipped" in r:
        print(f"{r['step']}: skipped ({r['skipped']})")
        continue
    status = "ok" if r["rc"] == 0 else "TIMED OUT" if r["timed_out"] else f"FAILED (exit {r['rc']})"
    found = r.get("result") or {}
    numbers = ", ".join(f"{k} {found[k]}" for k in keys if k in found) if isinstance(found, dict) else ""
    print(f"{r['step']}: {status} in {r['seconds']} s" + (f"; {numbers}" if numbers else "")
          + ("" if found else f"; last lines: {r.get('tail')}"))
EOF
cat "$DIR/summary.txt"
echo "gpu_check: wrote $DIR"
