#!/bin/bash
# One device run (stop 19): GPU timings (H100), then five trainings side by side on the one GPU:
# cfm on the multi set (issue 10), gan3d on clic-ecal, calogan on calogan-3layer, the HGCAL wgan, wgan on the multi set (issue 9).
# The training sets travel as .gpu/*.h5, made with scripts/pack_sparse.py (lossless):
#   python scripts/pack_sparse.py data/ild-multi-train.h5 .gpu/multi.h5 0 8500   (and clic-train, calogan-train, hgcal-train, all rows)
# then, through the device tool: T_END=530 bash scripts/gpu_session.sh  (carry .gpu). Writes $OUT/NAME.tgz per run.
# DEV=cpu T_END=... for a dry run here.
DEV=${DEV:-cuda}; T_END=${T_END:-505}; PROBE=${PROBE:-55}; TIMING=${TIMING:-1}; TH=${TH:-2}
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
export PYTHONPATH=$PWD/src${EXTRA_PP:+:$EXTRA_PP} PYTHONUNBUFFERED=1
O=${OUT:-/tmp/gpuout}; mkdir -p $O/logs; L=$O/logs
nvidia-smi -L 2>/dev/null; nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
CF="python3 -m caloforge"
if [ "$TIMING" = 1 ]; then
  timeout 40 python3 scripts/bench_gpu.py --sections gen --batches 1000,10000,50000 --json $L/gpu-gen.json > $L/bench-gpu.log 2>&1; echo "bench_gpu rc $? at $(el) s"
  timeout 15 $CF bench --model src/caloforge/pretrained/ild-ecal-bibae --device $DEV --no-geant4 --batch-sizes 1,100,1000 --energies 50 --repeats 3 --max-seconds 5 --json $L/bench-bibae.json > $L/bench-bibae.log 2>&1; echo "bibae rc $? at $(el) s"
  for s in euler:1 midpoint:4 midpoint:16; do
    timeout 12 $CF bench --model src/caloforge/pretrained/ild-ecal-cfm --device $DEV --no-geant4 --steps ${s#*:} --solver ${s%:*} --batch-sizes 1,100,1000 --energies 50 --repeats 3 --max-seconds 3 --json $L/bench-cfm-${s%:*}${s#*:}.json > $L/bench-cfm-${s%:*}${s#*:}.log 2>&1; echo "cfm $s rc $? at $(el) s"
  done
fi
BIG="--set train.max_steps=10000000 --set train.threads=$TH"
train() { # name data config extra...
  local n=$1 d=$2 c=$3; shift 3
  setsid $CF train --data $d --model ${c%%:*} --config configs/${c#*:}.toml --device $DEV -o /tmp/runs/$n -q "$@" > $L/train-$n.log 2>&1 &
  echo $! > /tmp/pid-$n
}
mkdir -p /tmp/runs
train gan3d-clic .gpu/clic.h5 gan3d:gan3d $BIG --set train.batch_size=64 --set train.checkpoint_every=500 --set train.val_every=2000
train calogan .gpu/calogan.h5 calogan:calogan $BIG --set train.batch_size=64 --set train.checkpoint_every=500 --set train.val_every=2000 \
  --set model.gen_channels=16 --set model.lc_channels=8 --set model.disc_channels=8 --set model.disc_features=32 --set model.disc_hidden=128 --set model.mbd_kernels=10 --set model.mbd_dims=5
train wgan-hgcal .gpu/hgcal.h5 wgan:wgan-hgcal $BIG --set train.checkpoint_every=1000 --set train.val_every=4000
train wgan-multi .gpu/multi.h5 wgan:wgan $BIG --set train.checkpoint_every=500 --set train.val_every=2000
CFM="--set train.batch_size=256 --set train.lr=1e-3 --set train.threads=$TH --set train.checkpoint_every=500 --set train.val_every=1000000"
train cfm-probe .gpu/multi.h5 cfm:cfm $CFM --set train.max_steps=10000000 --set train.warmup_steps=200
t_probe=$(( $(el) + PROBE )); while [ $(el) -lt $t_probe ]; do sleep 2; done
kill -- -$(cat /tmp/pid-cfm-probe) 2>/dev/null
rate=$(python3 - <<'P'
import json
try:
    h = [json.loads(x) for x in open("/tmp/runs/cfm-probe/history.jsonl") if '"train"' in x]
    a, b = (h[1], h[-1]) if len(h) > 2 else (h[0], h[-1])
    print((b["step"] - a["step"]) / max(b["time_s"] - a["time_s"], 1e-9) if len(h) > 1 else b["step"] / b["time_s"])
except Exception:
    print(5.0)
P
)
left=$(( T_END - $(el) - 30 )); steps=$(python3 -c "print(max(200, int($rate * $left * 0.85) // 100 * 100))")
echo "cfm probe: $rate steps/s; $left s left: $steps steps at $(el) s"; cp /tmp/runs/cfm-probe/history.jsonl $L/cfm-probe-history.jsonl
train cfm .gpu/multi.h5 cfm:cfm $CFM --set train.max_steps=$steps --set train.warmup_steps=$(( steps / 20 ))
while [ $(el) -lt $T_END ] && kill -0 $(cat /tmp/pid-cfm) 2>/dev/null; do sleep 2; done
for n in gan3d-clic calogan wgan-hgcal wgan-multi cfm; do kill -TERM -- -$(cat /tmp/pid-$n) 2>/dev/null; done; sleep 3
echo "stopped at $(el) s"; nvidia-smi --query-gpu=memory.used --format=csv 2>/dev/null
mkdir -p /tmp/pack
for n in gan3d-clic calogan wgan-hgcal wgan-multi cfm; do
  tail -c 300 $L/train-$n.log; echo; cp /tmp/runs/$n/history.jsonl $L/history-$n.jsonl 2>/dev/null
  mkdir -p /tmp/pack/$n; cp /tmp/runs/$n/run.json /tmp/runs/$n/history.jsonl /tmp/pack/$n/ 2>/dev/null
  if [ $n = cfm ] && [ -f /tmp/runs/cfm/model.json ] && ! kill -0 $(cat /tmp/pid-cfm) 2>/dev/null && grep -q "$steps" /tmp/runs/cfm/model.json; then
    mkdir -p /tmp/pack/cfm/model && cp /tmp/runs/cfm/model.* /tmp/pack/cfm/model/ && echo "cfm finished: final model"
  else
    python3 scripts/export_checkpoint.py /tmp/runs/$n -o /tmp/pack/$n/model > $L/export-$n.log 2>&1 || echo "export $n failed"
  fi
  tar czf $O/$n.tgz -C /tmp/pack $n
done
tar czf $O/logs.tgz -C $O logs; ls -la $O; echo "done at $(el) s"
