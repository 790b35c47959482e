#!/bin/bash
# One device run (stop 32): (1) the dense generate job with reused pinned host buffers against the commit before them
# (issue 11.3), old and new trees alternating on the GPU; (2) the Pythia production of issue 12 on the host's cores,
# resuming the chunks made here (the same README command: chunks depend on the seed only, not on --workers).
# Prepared here with
#   git worktree add /tmp/head 06d9fbd && rm -rf .gpu/head-src && mkdir -p .gpu && cp -r /tmp/head/src .gpu/head-src
#   rm -rf .gpu/head-src/caloforge/pretrained  (the models are given as paths)
#   .whl: the cp312 wheels of pythia8mc 8.317.2, fastjet 3.5.2.0 and fastjet's awkward 2.14.0, awkward_cpp 57,
#   vector 1.9.0, importlib-metadata (device README); carry .gpu .whl data/ttx.h5.chunks
# Stop 32 ran it twice on an H200: `bash scripts/gpu_s32.sh` (the bench; the production failed on the missing
# awkward wheel) and `BENCH=0 T_END=370 bash scripts/gpu_s32.sh` (the production alone).
# then, through the device tool: bash scripts/gpu_s32.sh (timeout 560 s). Dry run here:
#   mkdir -p /tmp/dry && cp -r data/ttx.h5.chunks /tmp/dry/ && DEV=cpu T_END=150 WORKERS=1 BATCH=500 EV=/tmp/dry/ttx.h5 \
#   OUT=/tmp/dryout bash scripts/gpu_s32.sh
BENCH=${BENCH:-1}; DEV=${DEV:-cuda}; T_END=${T_END:-500}; WORKERS=${WORKERS:-15}; BATCH=${BATCH:-10000}; EV=${EV:-data/ttx.h5}
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "wheels not installed"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
x=$(find /tmp/site -name Index.xml 2>/dev/null | head -1); [ -n "$x" ] && export PYTHIA8DATA=$(dirname $x)  # Pythia's xmldoc
O=${OUT:-/tmp/gpuout}; mkdir -p $O/logs; L=$O/logs
nvidia-smi -L 2>/dev/null; nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
CF="python3 -m caloforge"; M=src/caloforge/pretrained

# ---- 1. dense and sparse generate jobs, old tree against new, alone on the machine ------------------------------
[ "$BENCH" = 1 ] && timeout 170 python3 scripts/bench_alternate.py --tree head=.gpu/head-src --tree ring=src --models $M \
  --batch-sizes $BATCH --reps 2 --threads 2 --formats dense:none,sparse:none --whole-factor 3 \
  --device $DEV --json $L/bench-alternate.json > $L/bench-alternate.log 2>&1
echo "bench_alternate rc $? at $(el) s"; cat $L/bench-alternate.log | tail -12

# ---- 2. Pythia production on the host cores until the deadline ---------------------------------------------------
n0=$(ls $EV.chunks 2>/dev/null | wc -l)
setsid timeout $(( T_END - $(el) )) $CF events produce --process tth,ttbb -n 100000 --seed 1 -o $EV \
  --workers $WORKERS -q > $L/produce.log 2>&1 &
P=$!; wait $P; echo "produce rc $? at $(el) s: chunk files $n0 -> $(ls $EV.chunks | wc -l)"
kill -TERM -- -$P 2>/dev/null; sleep 2; rm -f $EV.chunks/*.tmp*
$CF events produce --process tth,ttbb -n 100000 --seed 1 -o $EV --snapshot /tmp/snap.h5 > $L/snap.log 2>&1
tail -3 $L/snap.log
tar czf - -C $(dirname $EV) $(basename $EV).chunks | split -b 15M - $O/chunks.tgz.part-
tar czf $O/logs.tgz -C $O logs && rm -rf $O/logs; ls -la $O; echo "done at $(el) s"
