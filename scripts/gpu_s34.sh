#!/bin/bash
# A device run for issue 12 prepared in stop 34 (not run yet: no device was lent): the event WGAN trained on the GPU
# at large batches on a training file made here, no production on the device (the chunks have outgrown the 64 MiB
# that travels; the production goes on here). Prepare here:
#   caloforge events produce -n 100000 --seed 1 -o data/ttx.h5 --snapshot data/ttx-s34.h5
#   caloforge events split data/ttx-s34.h5 --exclude data/ttx32-test.h5 --exclude data/ttx32-val.h5 \
#       --fractions 1 --seed 34 -o data/ttx34-train.h5
#   python -c "from caloforge.events.eventfile import read_events as r, write_events as w, Events as E; \
#       e = r('data/ttx34-train.h5'); w('data/ttx34-train-hl.h5', E(e.high_level, e.process, e.names, attrs=dict(e.attrs)))"
#       (the 26 variables the WGAN learns only: 13 MB instead of 28 for 136000 events)
#   mv src/caloforge/pretrained /tmp/pretrained-aside   (the working tree must stay under 64 MiB; restore after)
#   carry .whl data/ttx34-train-hl.h5 data/ttx32-val.h5 data/ttx32-test.h5
# (made at 11:07 on 28 November from 71210 ttH + 71054 ttbb events: 135996 training events)
# Run: BATCHES="8192 32768" STEPS=10000 T_END=520 bash scripts/gpu_s34.sh   (timeout_s 580)
# Dry run here (done): DEV=cpu WHEELS=none BATCHES="256" STEPS=40 T_END=120 OUT=/tmp/dryout \
#     bash scripts/gpu_s34.sh
# Each run: the talk's networks with stop 33's recipe (lr 5e-4, moving average 0.999, decay over the second half);
# the generated samples (as many events as the training file) come back for `events evaluate` here (the test file
# is not evaluated on the device: its critic and classifiers take most of an hour of CPU).
DEV=${DEV:-cuda}; T_END=${T_END:-520}; STEPS=${STEPS:-10000}; DECAY=$(( STEPS / 2 )); BATCHES=${BATCHES:-8192 32768}
TRAIN=${TRAIN:-data/ttx34-train-hl.h5}; VAL=${VAL:-data/ttx32-val.h5}; WHEELS=${WHEELS:-.whl}
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || echo "wheels not installed"
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export PYTHONUNBUFFERED=1
O=${OUT:-/tmp/gpuout}; mkdir -p $O/logs $O/runs $O/gen; L=$O/logs
nvidia-smi -L 2>/dev/null; nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
CF="python3 -m caloforge"
[ -f "$TRAIN" ] || { echo "no $TRAIN"; exit 2; }
for B in $BATCHES; do
  setsid timeout $(( T_END - $(el) )) $CF events train --data $TRAIN --val-data $VAL -o $O/runs/eventwgan-b$B \
    --steps $STEPS --batch-size $B --checkpoint-every 1000 --set lr=5e-4 --set ema=0.999 \
    --set lr_decay_steps=$DECAY --set lr_final=0.05 --seed 0 --threads 1 --device $DEV -q > $L/train-b$B.log 2>&1 &
done
wait
echo "trainings ended at $(el) s"
for B in $BATCHES; do
  r=$O/runs/eventwgan-b$B
  echo "$r: $(tail -1 $r/history.jsonl 2>/dev/null | cut -c1-200)"
  for m in best; do
    [ -f $r/$m/model.json ] && $CF events generate --model $r/$m --conditions-from $TRAIN -o $O/gen/b$B-$m.h5 \
      --seed 1 2>&1 | tail -1
  done
  rm -f $r/checkpoint.safetensors   # the last step's model.safetensors and best/ stay
done
tar czf - -C $O runs gen | split -b 15M - $O/runs.tgz.part- && rm -rf $O/runs $O/gen
tar czf $O/logs.tgz -C $O logs && rm -rf $O/logs; ls -la $O; echo "done at $(el) s"
