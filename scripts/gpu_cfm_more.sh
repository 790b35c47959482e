#!/bin/bash
# Second device call of stop 26 (issue 10): does more training help the flow-matching peer? The shipped ild-ecal-cfm
# (4300 steps at batch 256) trained on alone on the GPU, from its weights (`caloforge train --init-from`), on the
# same 12500 photons (.gpu/gamma.h5, see scripts/gpu_peers.sh), then sampled there at the test conditions.
#   through the device tool: bash scripts/gpu_cfm_more.sh (timeout 230 s; carry .gpu). Writes $OUT/cfm-more.tgz and
#   $OUT/gen-cfm-more-m16.h5. Dry run here: DEV=cpu T_TRAIN=40 STEPS=2 N_GEN=20 DATA=/tmp/dry.h5 bash ...
DEV=${DEV:-cuda}; T_TRAIN=${T_TRAIN:-150}; STEPS=${STEPS:-2500}; N_GEN=${N_GEN:-5000}; DATA=${DATA:-.gpu/gamma.h5}
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
O=${OUT:-/tmp/gpuout2}; mkdir -p $O /tmp/runs; rm -rf /tmp/runs/cfm-more
nvidia-smi -L 2>/dev/null
CF="python3 -m caloforge"
setsid $CF train --data $DATA --model cfm --config configs/cfm-patch.toml --set model.blocks=6 --init-from ild-ecal-cfm \
  --set train.batch_size=256 --set train.lr=5e-4 --set train.warmup_steps=100 --set train.amp=true \
  --set train.deterministic=false --set train.checkpoint_every=250 --set train.val_every=100000000 \
  --set train.log_every=20 --set train.max_steps=$STEPS --device $DEV -o /tmp/runs/cfm-more --seed 2 -q \
  > $O/train.log 2>&1 &
pid=$!
while [ $(el) -lt $T_TRAIN ] && kill -0 $pid 2>/dev/null; do sleep 2; done
kill -0 $pid 2>/dev/null && { kill -TERM -- -$pid; echo "training stopped at $(el) s"; sleep 2; }
echo "training over at $(el) s"; tail -c 300 $O/train.log
mkdir -p /tmp/pack/cfm-more; cp /tmp/runs/cfm-more/run.json /tmp/runs/cfm-more/history.jsonl /tmp/pack/cfm-more/
if [ -f /tmp/runs/cfm-more/model.safetensors ]; then mkdir -p /tmp/pack/cfm-more/model && cp /tmp/runs/cfm-more/model.* /tmp/pack/cfm-more/model/
else python3 scripts/export_checkpoint.py /tmp/runs/cfm-more -o /tmp/pack/cfm-more/model; fi
tar czf $O/cfm-more.tgz -C /tmp/pack cfm-more
timeout 60 $CF generate --model /tmp/pack/cfm-more/model --conditions-from .gpu/cond.h5 -n $N_GEN -o /tmp/gen.h5 \
  --device $DEV --format sparse --seed 1 -q --steps 16 --solver midpoint; echo "gen rc $? at $(el) s"
python3 scripts/pack_sparse.py /tmp/gen.h5 $O/gen-cfm-more-m16.h5 0 $N_GEN --drop-bits 10; ls -la $O; echo "done at $(el) s"
