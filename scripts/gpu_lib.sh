# Shell helpers shared by the device-run scripts (gpu_peers.sh, gpu_s30.sh); sourced after they set
# el (seconds since start), L (log folder), CF (the caloforge command), DATA (training file) and DEV (device).
train() { # name family:config extra...: a `caloforge train` run of its own in the background, pid in /tmp/pid-NAME
  local n=$1 c=$2; shift 2
  rm -rf /tmp/runs/$n
  setsid $CF train --data $DATA --model ${c%%:*} --config configs/${c#*:}.toml --device $DEV -o /tmp/runs/$n -q \
    --seed 1 "$@" > $L/train-$n.log 2>&1 &
  echo $! > /tmp/pid-$n
}
rate() { # steps/s between the second and the last logged training record
  python3 - "$1" <<'P'
import json, sys
try:
    h = [json.loads(x) for x in open(sys.argv[1]) if '"train"' in x]
    a, b = (h[1], h[-1]) if len(h) > 2 else ({"step": 0, "time_s": 0.0}, h[-1])
    print(round((b["step"] - a["step"]) / max(b["time_s"] - a["time_s"], 1e-9), 3))
except Exception:
    print(0)
P
}
stop() { kill -TERM -- -$(cat /tmp/pid-$1) 2>/dev/null; }
gpu_log() { while true; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null \
  | sed "s/^/$(el) s: /" >> $L/gpu-util.log; sleep 10; done; }
