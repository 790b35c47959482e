#!/bin/bash
# One device run (stop 33, issue 12): the event WGAN trained on the GPU at three batch sizes, beside the Pythia
# production on the host's other cores (the README command, resuming the chunks made here).
# Prepared here with
#   kill -STOP the local production; tar czf .gpu/chunks.tgz -C data ttx.h5.chunks
#   mv src/caloforge/pretrained /tmp/pretrained-aside   (the working tree must stay under 64 MiB; restored after)
#   carry .whl .gpu data/ttx32-val.h5 data/ttx32-test.h5
# The training file is made on the device as here (40371 events, the same file: checked).
# Ran on an H200: `bash scripts/gpu_s33.sh` (timeout 580 s), then with the rest of the device time
#   `BATCHES=8192 STEPS=7000 T_END=265 WORKERS=14 KEEP_CKPT=1 bash scripts/gpu_s33.sh` (timeout 295 s).
# Next lent GPU (finish batch 8192, try 32768): BATCHES="8192 32768" STEPS=10000 T_END=500 bash scripts/gpu_s33.sh
# Dry run here: DEV=cpu T_END=120 WORKERS=1 STEPS=300 OUT=/tmp/dryout bash scripts/gpu_s33.sh
DEV=${DEV:-cuda}; T_END=${T_END:-500}; WORKERS=${WORKERS:-13}; STEPS=${STEPS:-10000}; DECAY=$(( STEPS / 2 )); BATCHES=${BATCHES:-256 2048 8192}; KEEP_CKPT=${KEEP_CKPT:-0}
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "wheels not installed"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
x=$(find /tmp/site -name Index.xml 2>/dev/null | head -1); [ -n "$x" ] && export PYTHIA8DATA=$(dirname $x)
O=${OUT:-/tmp/gpuout}; mkdir -p $O/logs $O/runs; L=$O/logs; W=${WORK:-/tmp/ev}; mkdir -p $W
nvidia-smi -L 2>/dev/null; nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
CF="python3 -m caloforge"
tar xzf .gpu/chunks.tgz -C $W && touch $W/marker && sleep 1
# data/ttx33-train.h5 of this stop: the chunk prefix (ttH 0-160, ttbb 0-926) it was made from, less val and test
mkdir -p $W/pre/ttx.h5.chunks && cp $W/ttx.h5.chunks/manifest.json $W/pre/ttx.h5.chunks/
for k in $(seq 0 160); do ln -s $W/ttx.h5.chunks/tth-$(printf %05d $k).h5 $W/pre/ttx.h5.chunks/; done
for k in $(seq 0 926); do ln -s $W/ttx.h5.chunks/ttbb-$(printf %05d $k).h5 $W/pre/ttx.h5.chunks/; done
$CF events produce -n 100000 --seed 1 -o $W/pre/ttx.h5 --snapshot $W/snap.h5 2>&1 | tail -1
$CF events split $W/snap.h5 --exclude data/ttx32-test.h5 --exclude data/ttx32-val.h5 --fractions 1 --seed 33 \
  -o $W/train.h5 2>&1 | tail -1
echo "data ready at $(el) s"

# ---- the trainings (one core each), then the production on the rest until the deadline ----------------------------
for B in $BATCHES; do
  setsid timeout $(( T_END - $(el) )) $CF events train --data $W/train.h5 --val-data data/ttx32-val.h5 \
    -o $O/runs/eventwgan-b$B --steps $STEPS --batch-size $B --checkpoint-every 1000 --set lr=5e-4 --set ema=0.999 \
    --set lr_decay_steps=$DECAY --set lr_final=0.05 --seed 0 --threads 1 --device $DEV -q > $L/train-b$B.log 2>&1 &
done
setsid timeout $(( T_END - $(el) )) $CF events produce --process tth,ttbb -n 100000 --seed 1 -o $W/ttx.h5 \
  --workers $WORKERS -q > $L/produce.log 2>&1 &
P=$!; wait $P; echo "produce rc $? at $(el) s"
kill -TERM -- -$P 2>/dev/null; wait; sleep 2; rm -f $W/ttx.h5.chunks/*.tmp*
for f in $O/runs/*/history.jsonl; do echo "$f: $(tail -1 $f | cut -c1-160)"; done
$CF events produce -n 100000 --seed 1 -o $W/ttx.h5 --snapshot $W/snap2.h5 2>&1 | tail -1
cd $W && find ttx.h5.chunks -name '*.h5' -newer marker | tar czf - -T - | split -b 15M - $O/chunks-new.tgz.part- ; cd - >/dev/null
echo "new chunks: $(find $W/ttx.h5.chunks -name '*.h5' -newer $W/marker | wc -l)"
[ "$KEEP_CKPT" = 1 ] || for r in $O/runs/*; do rm -f $r/checkpoint.safetensors; done   # else model.safetensors: last step
tar czf - -C $O runs | split -b 15M - $O/runs.tgz.part- && rm -rf $O/runs
tar czf $O/logs.tgz -C $O logs && rm -rf $O/logs; ls -la $O; echo "done at $(el) s"
