#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, in few device calls. From the repo root on a GPU machine:
#   tools/bench/gpu_session.sh PHASE...     (logs in $OUT/NAME.log, OUT defaults to /tmp/out)
# Phases: setup tests infer train1 train2 publish threads gc attn profile loop2 loop4 loop4n
# Missing wheels (simple-parsing, docstring-parser, tqdm) travel in .whl/ (see the device README).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ] && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 NCCL_CUMEM_ENABLE=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run() { local name=$1; shift; echo "=== $name: $*"; ( "$@" ) 2>&1 | tee "$OUT/$name.log"; }
# the training figures: the engine as configured for them, 3 warm-up and 6 timed steps
TRAIN="tools/bench/train.py --engine-variants compiled --warmup 3 --steps 6"
T1="env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True torchrun --nproc_per_node=1"
T2="env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True torchrun --nproc_per_node=2"
for phase in "$@"; do
case $phase in
  setup) nvidia-smi -L; python3 -c "import torch, transformers, aiohttp, yaml; print(torch.__version__, transformers.__version__, torch.cuda.device_count())" ;;
  tests) run tests timeout 300 python3 -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_inference_engine.py tests/test_train_weight_group_torchrun.py ;;
  infer) run infer timeout 240 python3 tools/bench/infer.py --gpu ;;
  train1) # one GPU (GPU 0 of a multi-GPU machine): 0.5B next to plain transformers + AdamW, 1.5B without AC
          run train1_05 timeout 130 env CUDA_VISIBLE_DEVICES=0 $T1 $TRAIN --models qwen2.5-0.5b
          run train1_15 timeout 110 env CUDA_VISIBLE_DEVICES=0 $T1 $TRAIN --models qwen2.5-1.5b --impls engine --ac off ;;
  train2) run train2_05 timeout 150 $T2 $TRAIN --models qwen2.5-0.5b
          run train2_15 timeout 130 $T2 $TRAIN --models qwen2.5-1.5b --impls engine --ac off ;;
  publish) run publish timeout 200 torchrun --nproc_per_node=1 tools/bench/train.py --models qwen2.5-0.5b --impls engine --steps 1 --warmup 1 --publish 5 ;;
  threads) # one GPU, 0.5B: a CPU thread per core (16) against the engine's default of 8
           run threads8 timeout 130 $T1 $TRAIN --models qwen2.5-0.5b --impls engine
           run threads16 timeout 130 env OMP_NUM_THREADS=16 $T1 $TRAIN --models qwen2.5-0.5b --impls engine ;;
  gc) # 2 GPUs, 1.5B, three runs each: Python's collector as is (gc_s_per_step shows a full collection) and settled
      for i in 1 2 3; do run gc_auto_$i timeout 110 $T2 $TRAIN --models qwen2.5-1.5b --impls engine --ac off --gc auto; done
      for i in 1 2 3; do run gc_settled_$i timeout 110 $T2 $TRAIN --models qwen2.5-1.5b --impls engine --ac off; done ;;
  attn) run attn_kernels timeout 200 python3 tools/bench/attn.py kernels
        run attn_overhead timeout 150 python3 tools/bench/attn.py overhead ;;
  profile) # where a 0.5B step's time goes (kernels, GPU idle by engine phase), and the decode step
           run prof_train timeout 110 env CUDA_VISIBLE_DEVICES=0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 tools/bench/profiler.py train --variant compiled --rows 45
           run prof_decode timeout 150 python3 tools/bench/profiler.py decode ;;
  loop2) run loop2 timeout 560 python3 tools/bench/loop.py async-sync --gpus 2 --steps 10 ;;
  loop4) nvidia-smi topo -m; run loop4 timeout 580 python3 tools/bench/loop.py async-sync --gpus 4 --servers 2 --steps 10 --skip-toy --run-timeout 250 ;;
  loop4n) run loop4n timeout 500 python3 tools/bench/loop.py async-sync --gpus 4 --servers 2 --steps 10 --skip-toy --run-timeout 220 --ac off ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
done
