#!/usr/bin/env bash
# One GPU session, one call (~8 minutes on an H100/H200): every figure the speed issues ask for.
#   bash benchmarks/gpu_session.sh            # uses .venv/bin/python if present, else python3
# Each benchmark is guarded by `timeout` and `|| true`, so one failure (or a slow compile) does not
# lose the others. Output: the tables on stdout; copies of each log under $OUT (or ./runs/gpu_session).
# On the lent GPU machine (PyTorch preinstalled, no network) ddpmctl runs from the source tree; diffusers
# and importlib_metadata are not there, so carry their wheels in .whl/ (pure Python), fetched here with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 importlib_metadata
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOGS=${OUT:-runs/gpu_session}
mkdir -p "$LOGS"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

run() {  # run NAME SECONDS CMD...: prints a header, tees the log, never fails the script
    local name=$1 secs=$2; shift 2
    echo "=== $name ($(date +%T), limit ${secs}s): $*"
    timeout --signal=TERM --kill-after=15 "$secs" "$@" 2>&1 | tee "$LOGS/$name.log" || true
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$LOGS/gpu.txt" || true
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" || true

# ddpmctl vs diffusers: DDPM CIFAR-10 UNet, 32 px, batch 128 bf16 training; DDIM-50 at batch 256; eager + compile.
run compare 300 "$PY" benchmarks/compare.py --compile yes
# DDP wrapper overhead at N=1 (NCCL): images/s with and without DistributedDataParallel.
run ddp_overhead 60 "$PY" benchmarks/ddp_overhead.py
# doctor's predicted largest batch (no headroom) against the bisected real one, 128 px / 96 channels.
run doctor_bf16 90 "$PY" -m ddpmctl doctor --img-size 128 --starting-channels 96 --full --json --precision bf16 --headroom 0
run doctor_fp32 90 "$PY" -m ddpmctl doctor --img-size 128 --starting-channels 96 --full --json --precision fp32 --headroom 0
run sampling_speed 45 "$PY" benchmarks/sampling_speed.py --device cuda
echo "=== done $(date +%T); logs in $LOGS"
