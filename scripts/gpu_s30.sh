#!/bin/bash
# One device run (stop 30): the shipped models' GPU figures (issue 11), then the two seed families that need a GPU
# trained side by side on the angled photons of the house detector (issue 9: gan3d; issue 10: bibae).
#   1. timings alone on the GPU: bench_gpu.py (model only, with copies) and `caloforge bench --device cuda`
#      for `multi`; then `multi` sampled on the GPU at the conditions of the BIB-AE grid and of the
#      corner set (sparse files come back, evaluated on the CPU against Geant4: the CUDA path's physics);
#   2. bibae (centre_crop, 12 channels, latent 24) and gan3d (power-law cells) trained together on the 10000 angled
#      photons of ild-multi-train; a probe of PROBE seconds sizes bibae's step count and phase boundary so that it ends
#      inside T_TRAIN; gan3d (constant learning rate) runs to the deadline and its last checkpoint is exported;
#   3. both benched on the GPU. Their showers are generated on the CPU afterwards (the models come back, not files).
# Sets travel as .gpu/*.h5 (carry .gpu), made with
#   python scripts/photon_subset.py data/ild-multi-train.h5 data/ild-gamma-angled-train.h5
#   python scripts/pack_sparse.py data/ild-gamma-angled-train.h5 .gpu/gangled.h5 0 100000 --drop-bits 10
#   python scripts/pack_sparse.py data/ild-multi-grid.h5 .gpu/cond-mgrid.h5 0 9000 --conditions-only
#   python scripts/pack_sparse.py data/ild-gamma-test.h5 .gpu/cond-gtest.h5 0 5000 --conditions-only
# then, through the device tool: bash scripts/gpu_s30.sh (timeout 580 s). Dry run here:
#   DEV=cpu T_TRAIN=170 PROBE=40 TIMING=0 N_GEN=30 EXTRA_BIB="--set model.enc_channels=4 ..." bash scripts/gpu_s30.sh
DEV=${DEV:-cuda}; T_TRAIN=${T_TRAIN:-330}; PROBE=${PROBE:-50}; N_GEN=${N_GEN:-0}; TIMING=${TIMING:-1}
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
O=${OUT:-/tmp/gpuout}; mkdir -p $O/logs /tmp/runs; L=$O/logs
nvidia-smi -L 2>/dev/null; nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
CF="python3 -m caloforge"; DATA=.gpu/gangled.h5
source scripts/gpu_lib.sh  # train, rate, stop, gpu_log
gpu_log & GPU_LOG=$!

fit() { # keep a returned file under 15 MB (16 MiB each may come back): energies to 13 mantissa bits, then fewer rows
  local f=$1 n=$2 lim=15000000
  if [ -f $f ] && [ $(stat -c %s $f) -gt $lim ]; then
    mv $f $f.big; python3 scripts/pack_sparse.py $f.big $f 0 $n --drop-bits 10; echo "$f: repacked"; fi
  while [ -f $f ] && [ $(stat -c %s $f) -gt $lim ] && [ $n -gt 100 ]; do
    n=$(( n * 3 / 4 )); python3 scripts/pack_sparse.py $f.big $f 0 $n --drop-bits 10; echo "$f: cut to $n rows"; done
  rm -f $f.big
}

# ---- 1. the shipped models on the GPU, alone -------------------------------------------------------------
if [ "$TIMING" = 1 ]; then
  timeout 80 python3 scripts/bench_gpu.py --sections gen --models default,multi --batches 1000,10000,50000 \
    --json $L/bench-gpu.json > $L/bench-gpu.log 2>&1; echo "bench_gpu rc $? at $(el) s"
  for m in multi; do
    timeout 25 $CF bench --model $m --device $DEV --no-geant4 --batch-sizes 1,100,1000,10000,50000 --energies 50 \
      --repeats 3 --max-seconds 3 --json $L/bench-$m.json > $L/bench-$m.log 2>&1; echo "bench $m rc $? at $(el) s"
  done
  timeout 40 $CF generate --model multi --conditions-from .gpu/cond-mgrid.h5 -o $O/multi-grid-cuda.h5 --device $DEV \
    --format sparse --batch-size 10000 --seed 2 -q > $L/gen-multi-grid.log 2>&1; echo "gen multi grid rc $? at $(el) s"; fit $O/multi-grid-cuda.h5 9000
  timeout 40 $CF generate --model multi --conditions-from .gpu/cond-gtest.h5 -o $O/multi-gtest-cuda.h5 --device $DEV \
    --format sparse --batch-size 10000 --seed 1 -q > $L/gen-multi-gtest.log 2>&1; echo "gen multi corner rc $? at $(el) s"; fit $O/multi-gtest-cuda.h5 5000
fi

# ---- 2. bibae and gan3d on the angled photons, together ---------------------------------------------------
BIB="--set train.batch_size=64 --set train.deterministic=false --set train.checkpoint_every=250 --set train.log_every=20
  --set model.enc_channels=12 --set model.dec_channels=12 --set model.critic_channels=12 --set model.latent_dim=24
  --set model.sorted_cells=512 --set model.post_channels=16 --set model.post_layers=3 --set model.flow_hidden=64
  --set model.critic_reset_every=1000 --set model.centre_crop=true $EXTRA_BIB"
G3D="--set train.batch_size=64 --set train.deterministic=false --set train.checkpoint_every=250 --set train.log_every=20
  --set train.val_every=100000000 --set train.max_steps=100000000 --set model.cell_power=0.5 $EXTRA_G3D"
t_train0=$(el); T_END=$(( t_train0 + T_TRAIN ))
train gan3d gan3d:gan3d $G3D
train bibae bibae:bibae $BIB --set train.max_steps=100000000 --set model.post_start_step=100000000
sleep $PROBE; stop bibae; sleep 2
r_bib=$(rate /tmp/runs/bibae/history.jsonl); [ "$r_bib" = 0 ] && r_bib=${RATE_FALLBACK:-4}; cp /tmp/runs/bibae/history.jsonl $L/probe-bibae.jsonl
left=$(( T_END - $(el) - 20 - 60 ))  # 20 s start-up, 60 s for the exports and benches after
n_bib=$(python3 -c "print(max(40, int($r_bib * $left * 0.9) // 20 * 20))")
p_bib=$(python3 -c "print(int($n_bib * 0.75))")
echo "probe at $(el) s: bibae $r_bib steps/s (gan3d beside it); $left s left: bibae $n_bib steps ($p_bib)"
train bibae bibae:bibae $BIB --set train.max_steps=$n_bib --set model.post_start_step=$p_bib
while [ $(el) -lt $(( T_END - 60 )) ] && kill -0 $(cat /tmp/pid-bibae) 2>/dev/null; do sleep 2; done
for n in bibae gan3d; do kill -0 $(cat /tmp/pid-$n) 2>/dev/null && { echo "$n still running at $(el) s: stopped"; stop $n; }; done
sleep 3; echo "training over at $(el) s"
mkdir -p /tmp/pack
for n in bibae gan3d; do
  tail -c 400 $L/train-$n.log; echo
  mkdir -p /tmp/pack/$n; cp /tmp/runs/$n/run.json /tmp/runs/$n/history.jsonl /tmp/pack/$n/ 2>/dev/null
  if [ -f /tmp/runs/$n/model.safetensors ]; then mkdir -p /tmp/pack/$n/model && cp /tmp/runs/$n/model.* /tmp/pack/$n/model/ \
    && echo "$n finished: final model"
  else python3 scripts/export_checkpoint.py /tmp/runs/$n -o /tmp/pack/$n/model > $L/export-$n.log 2>&1 || echo "export $n failed"; fi
  tar czf $O/$n.tgz -C /tmp/pack $n
done

# ---- 3. their speed on the device --------------------------------------------------------------------------
for n in bibae gan3d; do
  timeout 20 $CF bench --model /tmp/pack/$n/model --device $DEV --no-geant4 --batch-sizes 1,100,1000 --energies 50 \
    --repeats 3 --max-seconds 3 --json $L/bench-$n.json > $L/bench-$n.log 2>&1; echo "bench $n rc $? at $(el) s"
done
if [ "$N_GEN" -gt 0 ]; then  # dry runs: a few showers of each, to check the models sample
  for n in bibae gan3d; do timeout 60 $CF generate --model /tmp/pack/$n/model --conditions-from .gpu/cond-ggrid.h5 -n $N_GEN \
    -o $O/gen-$n.h5 --device $DEV --format sparse --seed 1 -q > $L/gen-$n.log 2>&1; echo "gen $n rc $? at $(el) s"; done
fi
kill $GPU_LOG 2>/dev/null
tar czf $O/logs.tgz -C $O logs && rm -rf $O/logs; ls -la $O; echo "done at $(el) s"
