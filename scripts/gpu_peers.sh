#!/bin/bash
# One device run (stop 26, issue 10): the two fidelity peers trained side by side on one lent GPU, on the photons at
# normal incidence of the house detector, then sampled on the GPU at the conditions of the test set:
#   cfm (flow matching, patch tokens 3 x 5 x 5, 6 blocks) at batch 256, bf16 autocast;
#   bibae (12 channels, latent flow and post-processor) at batch 64.
# A probe of PROBE seconds measures both runs' steps/s together; both are then started again with step counts
# (and bibae's phase boundary) that end inside T_TRAIN seconds. The sets travel as .gpu/*.h5 (carry .gpu):
#   python scripts/pack_sparse.py data/ild-gamma-train.h5 .gpu/gamma.h5 0 12500 --drop-bits 10
#   python scripts/pack_sparse.py data/ild-gamma-test.h5 .gpu/cond.h5 0 5000 --conditions-only
# then, through the device tool: bash scripts/gpu_peers.sh (timeout 590 s). Writes $OUT/{cfm,bibae,logs}.tgz and
# $OUT/gen-*.h5 (sparse). Dry run here: DEV=cpu T_TRAIN=60 PROBE=25 EXTRA_CFM="--set model.blocks=1" bash ...
DEV=${DEV:-cuda}; T_TRAIN=${T_TRAIN:-400}; PROBE=${PROBE:-60}; N_GEN=${N_GEN:-5000}
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
O=${OUT:-/tmp/gpuout}; mkdir -p $O/logs /tmp/runs; L=$O/logs
nvidia-smi -L 2>/dev/null; nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
CF="python3 -m caloforge"; DATA=${DATA:-.gpu/gamma.h5}; COND=${COND:-.gpu/cond.h5}
CFM="--set train.batch_size=256 --set train.lr=1e-3 --set train.amp=true --set train.deterministic=false
  --set train.checkpoint_every=500 --set train.val_every=100000000 --set train.log_every=20 --set model.blocks=6 $EXTRA_CFM"
BIB="--set train.batch_size=64 --set train.deterministic=false --set train.checkpoint_every=500 --set train.log_every=20
  --set model.enc_channels=12 --set model.dec_channels=12 --set model.critic_channels=12 --set model.latent_dim=24
  --set model.sorted_cells=512 --set model.post_channels=16 --set model.post_layers=3 --set model.flow_hidden=64
  --set model.critic_reset_every=1000 $EXTRA_BIB"
source scripts/gpu_lib.sh  # train, rate, stop, gpu_log
gpu_log & GPU_LOG=$!

# ---- probe: both runs together, as they will run ------------------------------------------------------
train cfm cfm:cfm-patch $CFM --set train.max_steps=100000000 --set train.warmup_steps=200
train bibae bibae:bibae $BIB --set train.max_steps=100000000 --set model.post_start_step=100000000
sleep $PROBE; stop cfm; stop bibae; sleep 2
r_cfm=$(rate /tmp/runs/cfm/history.jsonl); r_bib=$(rate /tmp/runs/bibae/history.jsonl)
cp /tmp/runs/cfm/history.jsonl $L/probe-cfm.jsonl; cp /tmp/runs/bibae/history.jsonl $L/probe-bibae.jsonl
left=$(( T_TRAIN - $(el) - 25 ))  # 25 s: start-up of the two processes (CUDA, data onto the GPU)
n_cfm=$(python3 -c "print(max(200, int($r_cfm * $left * 0.92) // 100 * 100))")
n_bib=$(python3 -c "print(max(100, int($r_bib * $left * 0.92) // 50 * 50))")
p_bib=$(python3 -c "print(int($n_bib * 0.75))")
echo "probe at $(el) s: cfm $r_cfm steps/s, bibae $r_bib steps/s; $left s left: cfm $n_cfm steps, bibae $n_bib ($p_bib)"

# ---- the real runs --------------------------------------------------------------------------------------
train cfm cfm:cfm-patch $CFM --set train.max_steps=$n_cfm --set train.warmup_steps=$(( n_cfm / 20 ))
train bibae bibae:bibae $BIB --set train.max_steps=$n_bib --set model.post_start_step=$p_bib
while [ $(el) -lt $T_TRAIN ] && { kill -0 $(cat /tmp/pid-cfm) 2>/dev/null || kill -0 $(cat /tmp/pid-bibae) 2>/dev/null; }; do
  sleep 2; done
for n in cfm bibae; do kill -0 $(cat /tmp/pid-$n) 2>/dev/null && { echo "$n still running at $(el) s: stopped"; stop $n; }; done
sleep 2; echo "training over at $(el) s"
mkdir -p /tmp/pack
for n in cfm bibae; do
  tail -c 400 $L/train-$n.log; echo
  mkdir -p /tmp/pack/$n; cp /tmp/runs/$n/run.json /tmp/runs/$n/history.jsonl /tmp/pack/$n/ 2>/dev/null
  if [ -f /tmp/runs/$n/model.safetensors ]; then mkdir -p /tmp/pack/$n/model && cp /tmp/runs/$n/model.* /tmp/pack/$n/model/ \
    && echo "$n finished: final model"
  else python3 scripts/export_checkpoint.py /tmp/runs/$n -o /tmp/pack/$n/model > $L/export-$n.log 2>&1 || echo "export $n failed"; fi
  tar czf $O/$n.tgz -C /tmp/pack $n
done

# ---- samples at the test conditions and timings, on the device ------------------------------------------
fit() { # keep a generated file under LIMIT bytes (64 MB may come back in all): energies to 13 mantissa bits, then rows
  local f=$1 n=$2 lim=${3:-${FIT_LIMIT:-12000000}}
  if [ -f $f ] && [ $(stat -c %s $f) -gt $lim ]; then
    mv $f $f.big; python3 scripts/pack_sparse.py $f.big $f 0 $n --drop-bits 10; echo "$f: repacked"; fi
  while [ -f $f ] && [ $(stat -c %s $f) -gt $lim ] && [ $n -gt 100 ]; do
    n=$(( n / 2 )); python3 scripts/pack_sparse.py $f.big $f 0 $n --drop-bits 10; echo "$f: cut to $n rows"; done
  rm -f $f.big
}
gen() { # name rows model extra...
  local n=$1 k=$2 m=$3; shift 3
  timeout 60 $CF generate --model $m --conditions-from $COND -n $k -o $O/gen-$n.h5 --device $DEV --format sparse \
    --seed 1 -q "$@" > $L/gen-$n.log 2>&1; echo "gen $n rc $? at $(el) s"; fit $O/gen-$n.h5 $k
}
gen cfm-m16 $N_GEN /tmp/pack/cfm/model --steps 16 --solver midpoint
gen cfm-m4 $N_GEN /tmp/pack/cfm/model --steps 4 --solver midpoint
gen bibae $N_GEN /tmp/pack/bibae/model
gen cfm-e1 2000 /tmp/pack/cfm/model --steps 1 --solver euler
for s in euler:1 midpoint:4 midpoint:16; do
  timeout 15 $CF bench --model /tmp/pack/cfm/model --device $DEV --no-geant4 --steps ${s#*:} --solver ${s%:*} \
    --batch-sizes 1,100,1000,10000 --energies 50 --repeats 3 --max-seconds 3 --json $L/bench-cfm-${s%:*}${s#*:}.json \
    > $L/bench-cfm-${s%:*}${s#*:}.log 2>&1; echo "bench cfm $s rc $? at $(el) s"
done
for m in bibae:/tmp/pack/bibae/model layerflow:default multi:multi; do  # the baselines on the same device
  timeout 15 $CF bench --model ${m#*:} --device $DEV --no-geant4 --batch-sizes 1,100,1000,10000 --energies 50 \
    --repeats 3 --max-seconds 3 --json $L/bench-${m%%:*}.json > $L/bench-${m%%:*}.log 2>&1; echo "bench $m rc $? at $(el) s"
done
kill $GPU_LOG 2>/dev/null
tar czf $O/logs.tgz -C $O logs && rm -rf $O/logs; ls -la $O; echo "done at $(el) s"
