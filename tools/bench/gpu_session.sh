#!/usr/bin/env bash
# GPU runs in few device calls (see docs/benchmarks.md). Usage, from the repo root on a GPU machine:
#   tools/bench/gpu_session.sh setup|tests|wgroup|infer|train1|train2|sync2|loop2|loop4|loop4n|profile|prof2|ab|train2n|attn|final1|final2|final3|mfu2gpu|mfunext|attnk|fusepad|mfu2n|diag2k|final5|final6|units|gaps|host|final7|final8|final9|s7a|s7b|s7c|s7d|s7e|s7f|s7g|proftrain|publish|diag2|train2s
# Missing wheels (simple-parsing, docstring-parser, tqdm) travel in .whl/ (see the device README).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ] && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 NCCL_CUMEM_ENABLE=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EXPANDABLE=PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
run() { local name=$1; shift; echo "=== $name: $*"; ( "$@" ) 2>&1 | tee "$OUT/$name.log"; }
for phase in "$@"; do
case $phase in
  setup) nvidia-smi -L; python3 -c "import torch, transformers, aiohttp, yaml; print(torch.__version__, transformers.__version__, torch.cuda.device_count())" ;;
  tests) run tests timeout 300 python3 -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_inference_engine.py tests/test_train_weight_group_torchrun.py ;;
  wgroup) run wgroup timeout 280 python3 -m pytest -q -rs tests/test_train_weight_group_torchrun.py ;;
  infer) run infer timeout 240 python3 tools/bench/inference_throughput.py --gpu ;;
  train1) run train1 timeout 240 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants fused,compiled
          run train1b timeout 240 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants fused,compiled --impls engine ;;
  publish) run publish timeout 200 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --impls engine --steps 1 --warmup 1 --publish 5 ;;
  train2) run train2 timeout 330 torchrun --nproc_per_node=2 tools/bench/train_throughput.py --engine-variants compiled
          run train1c timeout 150 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled --impls engine --ac on
          run train1d timeout 150 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled --impls engine --ac off ;;
  diag2) run train2f timeout 170 torchrun --nproc_per_node=2 tools/bench/train_throughput.py --engine-variants fused --impls engine
         run recompile env TORCH_LOGS=recompiles,graph_breaks timeout 110 torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled --impls engine --steps 2 --warmup 2 ;;
  train2s) run train2s timeout 170 torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants fused,compiled --impls engine --steps 4 ;;
  proftrain) run prof_train timeout 240 python3 tools/bench/profile_gpu.py train --variant compiled ;;
  ab) # A/B of training throughput against an older tree in .old/ (git archive REV areal_hpc tools | tar -x -C .old)
      run gpu1 timeout 240 python3 -m pytest -q -rs -m gpu tests/test_gpu.py -k compiled_varlen
      run old05 timeout 150 bash -c "cd .old && torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled --impls engine"
      run new05 timeout 200 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled
      run old15 timeout 150 bash -c "cd .old && torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled --impls engine --ac off"
      run new15 timeout 200 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled --ac off
      run prof05n timeout 150 python3 tools/bench/profile_gpu.py train --variant compiled --rows 60 ;;
  train2n) run train2n05 timeout 200 torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled
           run train2n15 timeout 240 torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled --impls engine --ac off ;;
  final1) run gpu1 timeout 240 python3 -m pytest -q -rs -m gpu tests/test_gpu.py -k compiled_varlen
          run f05 timeout 200 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled --sync-debug
          run f15 timeout 200 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled --impls engine --ac off
          run attn2 timeout 150 python3 tools/bench/attn_overhead.py ;;
  final2) run new05 timeout 200 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled,compiled_keep --impls engine
          run old05 timeout 150 bash -c "cd .old && torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled --impls engine"
          run new15 timeout 240 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled,compiled_keep --impls engine --ac off
          run new15m4 timeout 150 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled_keep --impls engine --ac off --mbs-per-step 4 ;;
  final3) run old15 timeout 150 bash -c "cd .old && torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled --impls engine --ac off"
          run new15e timeout 240 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled,compiled_keep --impls engine --ac off ;;
  mfu2gpu) # the current engine on 2 GPUs (nvidia-h100-x2), kept logits, expandable segments
           run m2g05 timeout 200 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled_keep
           run m2g15 timeout 240 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled_keep --impls engine --ac off ;;
  mfunext) # one GPU: 4 micro-batches per step, and profiles of the current step (kept logits, expandable segments)
           run m4 timeout 240 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py --engine-variants compiled_keep --impls engine --ac off --mbs-per-step 4
           run prof05k timeout 150 env $EXPANDABLE python3 tools/bench/profile_gpu.py train --variant compiled_keep --rows 60
           run prof15k timeout 200 env $EXPANDABLE python3 tools/bench/profile_gpu.py train --variant compiled_keep --model qwen2.5-1.5b --ac off --rows 60 ;;
  fusepad) # padded micro-batches (static shapes) and fused sibling projections vs compiled_keep, one GPU
           run gpu1 timeout 150 python3 -m pytest -q -rs -m gpu tests/test_gpu.py -k compiled_varlen
           run fp05 timeout 270 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled_keep,compiled_pad,compiled_pad_fuse --impls engine
           run fp15 timeout 200 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled_keep,compiled_pad_fuse --impls engine --ac off ;;
  mfu2n) # 2 GPUs (nvidia-h100-x2): why compiled_keep recompiles there (recompile log), and the padded, fused engine
         run m2r05 timeout 230 env $EXPANDABLE TORCH_LOGS=recompiles torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants ${VARIANT2:-compiled_pad_fuse},compiled_keep --impls engine --steps 4
         run m2p15 timeout 200 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants ${VARIANT2:-compiled_pad_fuse} --impls engine --ac off ;;
  diag2k) # 2 GPUs: the slow compiled_keep run of mfu2gpu again (same data), with the recompile log
          run d2k05 timeout 200 env $EXPANDABLE TORCH_LOGS=recompiles torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled_keep --impls engine ;;
  final5) # 2 GPUs, then 1 GPU of the same machine: the engine as configured now next to plain transformers + AdamW
          run f5_2g05 timeout 260 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled_fuse,compiled_pad_fuse --warmup 3
          run f5_1g05 timeout 170 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled_pad_fuse --warmup 3 ;;
  final6) # one GPU: the engine as configured now next to plain transformers + AdamW (0.5B), and 1.5B
          run f6_05 timeout 170 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled_pad_fuse --warmup 3
          run f6_15 timeout 150 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-1.5b --engine-variants compiled_pad_fuse --impls engine --ac off --warmup 3 ;;
  units) # one GPU, 0.5B: one FSDP unit per decoder layer vs one for the whole model
         run u05 timeout 200 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled_pad_fuse,compiled_pad_fuse_unit --impls engine --warmup 3 ;;
  gaps) # one GPU: the GPU test of the compiled engine, where the GPU waits in a step (0.5B, 1.5B), and the
        # engine against the tree in .old/ (one read of the statistics per step vs three)
        V=compiled_pad_fuse_unit
        run gpu1 timeout 130 python3 -m pytest -q -rs -m gpu tests/test_gpu.py -k compiled_varlen
        run gap05 timeout 110 env $EXPANDABLE python3 tools/bench/profile_gpu.py train --variant $V --rows 30
        run gap15 timeout 130 env $EXPANDABLE python3 tools/bench/profile_gpu.py train --variant $V --model qwen2.5-1.5b --ac off --rows 30
        run new05 timeout 100 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants $V --impls engine --warmup 3
        run old05 timeout 100 bash -c "cd .old && env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants $V --impls engine --warmup 3" ;;
  host) # GPU 0 alone: the same 0.5B engine with and without torchrun (which sets OMP_NUM_THREADS=1),
        # with more threads, with the garbage collector off; then 2 GPUs: one FSDP unit per layer vs one unit
        V="--models qwen2.5-0.5b --impls engine --warmup 3 --steps 6"
        run h_py timeout 90 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 python3 tools/bench/train_throughput.py $V --engine-variants compiled_pad_fuse_unit
        run h_tr timeout 90 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --engine-variants compiled_pad_fuse_unit
        run h_omp timeout 90 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=8 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --engine-variants compiled_pad_fuse_unit
        run h_gc timeout 90 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --engine-variants compiled_pad_fuse_unit --gc off
        run u2_05 timeout 170 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --engine-variants compiled_pad_fuse_unit,compiled_pad_fuse_model ;;
  final7) # the engine as configured now, 1 GPU (GPU 0) then 2 GPUs of one machine, next to plain transformers + AdamW
          V="--warmup 3 --steps 6"
          run f7_1g05 timeout 120 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-0.5b --engine-variants compiled_pad_fuse_unit
          run f7_1g15 timeout 110 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-1.5b --engine-variants compiled_pad_fuse_unit --impls engine --ac off
          run f7_2g05 timeout 150 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --models qwen2.5-0.5b --engine-variants compiled_pad_fuse_model
          run f7_2g15 timeout 190 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --models qwen2.5-1.5b --engine-variants compiled_pad_fuse_model,compiled_pad_fuse_unit --impls engine --ac off ;;
  final8) # 2 GPUs: the GPU tests, then the engine as configured now (fsdp_units=auto: one unit on one host for these
          # sizes) next to plain transformers + AdamW
          V="--warmup 3 --steps 6 --engine-variants compiled_pad_fuse_unit"
          run tests timeout 230 python3 -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_train_weight_group_torchrun.py
          run f8_2g05 timeout 150 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --models qwen2.5-0.5b
          run f8_2g15 timeout 150 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --models qwen2.5-1.5b --impls engine --ac off ;;
  final9) # one GPU (nvidia-h100-x1): the engine as configured now next to plain transformers + AdamW, 0.5B and 1.5B;
          # and 0.5B with a CPU thread per core (OMP_NUM_THREADS=16), as every earlier torchrun figure on one GPU ran
          V="--warmup 3 --steps 6 --engine-variants compiled_pad_fuse_unit"
          run f9_05 timeout 130 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-0.5b
          run f9_15 timeout 110 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-1.5b --impls engine --ac off
          run f9_05t16 timeout 90 env $EXPANDABLE OMP_NUM_THREADS=16 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-0.5b --impls engine ;;
  s7a) # 2 GPUs then GPU 0 alone (seventh round): the engine with micro-batches planned to fit two per rank, next to
       # plain transformers + AdamW; inductor's coordinate-descent tuning on GPU 0; a profile of the 0.5B step
       V="--warmup 3 --steps 6 --engine-variants compiled_pad_fuse_unit"
       run s7_2g05 timeout 150 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --models qwen2.5-0.5b
       run s7_2g15 timeout 150 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --models qwen2.5-1.5b --impls engine --ac off
       run s7_1g05 timeout 100 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-0.5b --impls engine
       run s7_1g05cd timeout 140 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-0.5b --impls engine
       run s7_prof05 timeout 100 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 python3 tools/bench/profile_gpu.py train --variant compiled_pad_fuse_unit --rows 45 ;;
  s7b) # the GPU tests; GPU 0 alone: 0.5B next to plain transformers + AdamW, 1.5B; 2 GPUs: 1.5B over 12 steps with
       # the garbage collector as is and off (a slow step now and then in 2-GPU 1.5B runs)
       V="--warmup 3 --steps 6 --engine-variants compiled_pad_fuse_unit"
       run tests timeout 230 python3 -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_train_weight_group_torchrun.py
       run s7_1g05h timeout 120 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-0.5b
       run s7_1g15 timeout 110 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-1.5b --impls engine --ac off
       V="--warmup 3 --steps 12 --engine-variants compiled_pad_fuse_unit --models qwen2.5-1.5b --impls engine --ac off"
       run s7_2g15a timeout 130 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V
       run s7_2g15g timeout 130 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --gc off ;;
  s7c) # one GPU (nvidia-h100-x1): the engine next to plain transformers + AdamW, 0.5B, and 1.5B; where the 0.5B step idles
       V="--warmup 3 --steps 6 --engine-variants compiled_pad_fuse_unit"
       run s7_h05 timeout 130 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-0.5b
       run s7_h15 timeout 110 env $EXPANDABLE torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-1.5b --impls engine --ac off
       run s7_hprof05 timeout 110 env $EXPANDABLE python3 tools/bench/profile_gpu.py train --variant compiled_pad_fuse_unit --rows 60 ;;
  s7d) # the engine as it is at the end of the seventh round: 2 GPUs, then GPU 0 alone (0.5B twice: machines and runs
       # differ by a few per cent), each next to plain transformers + AdamW
       V="--warmup 3 --steps 6 --engine-variants compiled_pad_fuse_unit"
       run s7d_2g05 timeout 150 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --models qwen2.5-0.5b
       run s7d_2g15 timeout 130 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --models qwen2.5-1.5b --impls engine --ac off
       run s7d_1g05 timeout 120 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-0.5b
       run s7d_1g15 timeout 100 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-1.5b --impls engine --ac off
       run s7d_1g05b timeout 90 env $EXPANDABLE CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=1 tools/bench/train_throughput.py $V --models qwen2.5-0.5b --impls engine ;;
  s7e) # 2 GPUs, 1.5B: the last of six timed steps was slow in three of four runs (not in 12-step runs): 6 and 7 timed
       # steps, with the GPUs' clocks, power and throttle reasons sampled every 100 ms
       V="--warmup 3 --engine-variants compiled_pad_fuse_unit --models qwen2.5-1.5b --impls engine --ac off"
       nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 100 > "$OUT/s7e_smi.csv" 2>&1 &
       SMI=$!
       run s7e_6 timeout 130 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --steps 6
       run s7e_7 timeout 130 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --steps 7
       kill $SMI ;;
  s7f) # 2 GPUs, 1.5B, three runs of 6 timed steps: the garbage collector's seconds in each step (gc_s_per_step)
       V="--warmup 3 --steps 6 --engine-variants compiled_pad_fuse_unit --models qwen2.5-1.5b --impls engine --ac off"
       for i in 1 2 3; do run s7f_$i timeout 110 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V --gc auto; done ;;
  s7g) # s7f with the collector settled as trainers now run it (the bench's default --gc settled): three runs
       V="--warmup 3 --steps 6 --engine-variants compiled_pad_fuse_unit --models qwen2.5-1.5b --impls engine --ac off"
       for i in 1 2 3; do run s7g_$i timeout 110 env $EXPANDABLE torchrun --nproc_per_node=2 tools/bench/train_throughput.py $V; done ;;
  attnk) run attnk timeout 200 python3 tools/bench/attn_kernels.py ;;
  attn) run attn timeout 240 python3 tools/bench/attn_overhead.py
        run new05c timeout 200 torchrun --nproc_per_node=1 tools/bench/train_throughput.py --models qwen2.5-0.5b --engine-variants compiled --impls engine --sync-debug ;;
  prof2) run prof05 timeout 200 python3 tools/bench/profile_gpu.py train --variant compiled --rows 60
         run prof15 timeout 240 python3 tools/bench/profile_gpu.py train --variant compiled --model qwen2.5-1.5b --ac off --rows 60 ;;
  profile) run prof_train timeout 240 python3 tools/bench/profile_gpu.py train
           run prof_hf timeout 150 python3 tools/bench/profile_gpu.py train --impl hf
           run prof_decode timeout 150 python3 tools/bench/profile_gpu.py decode ;;
  sync2) run sync2 timeout 120 python3 -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_train_weight_group_torchrun.py -k "nccl or weight_group"
         run loop2s timeout 150 python3 tools/bench/gpu_loop.py --gpus 2 --steps 6 --only sync --run-timeout 130 ;;
  loop2) run loop2 timeout 560 python3 tools/bench/gpu_loop.py --gpus 2 --steps 10 ;;
  loop4) nvidia-smi topo -m; run loop4 timeout 580 python3 tools/bench/gpu_loop.py --gpus 4 --servers 2 --steps 10 --skip-toy --run-timeout 250 ;;
  loop4n) run loop4n timeout 500 python3 tools/bench/gpu_loop.py --gpus 4 --servers 2 --steps 10 --skip-toy --run-timeout 220 --ac off ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
done
