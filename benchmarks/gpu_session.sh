#!/usr/bin/env bash
# One GPU session, one call (~8 minutes on an H100/H200): every figure the speed issues ask for.
#   bash benchmarks/gpu_session.sh            # uses .venv/bin/python if present, else python3
# Each benchmark is guarded by `timeout` and `|| true`, so one failure (or a slow compile) does not
# lose the others. Output: the tables on stdout; copies of each log under $OUT (or ./runs/gpu_session).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOGS=${OUT:-runs/gpu_session}
mkdir -p "$LOGS"

run() {  # run NAME SECONDS CMD...: prints a header, tees the log, never fails the script
    local name=$1 secs=$2; shift 2
    echo "=== $name ($(date +%T), limit ${secs}s): $*"
    timeout --signal=TERM --kill-after=15 "$secs" "$@" 2>&1 | tee "$LOGS/$name.log" || true
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$LOGS/gpu.txt" || true
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" || true

# ddpmctl vs diffusers: DDPM CIFAR-10 UNet, 32 px, batch 128 bf16 training; DDIM-50 at batch 256; eager + compile.
run compare 330 "$PY" benchmarks/compare.py --compile yes
[ -f benchmarks/ddp_overhead.py ] && run ddp_overhead 60 "$PY" benchmarks/ddp_overhead.py
[ -f benchmarks/doctor_probe.py ] && run doctor_probe 45 "$PY" benchmarks/doctor_probe.py --gpu
[ -f benchmarks/sampling_speed.py ] && run sampling_speed 60 "$PY" benchmarks/sampling_speed.py --gpu
echo "=== done $(date +%T); logs in $LOGS"
