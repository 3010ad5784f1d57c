#!/usr/bin/env python
"""Training throughput of the FSDP2 engine vs plain transformers + AdamW, in one run.

Models: the Qwen2.5-0.5B and 1.5B architectures (random init, vocab 151936). The engine trains
on variable-length documents packed into ``--tokens-per-mb``-token micro-batches; the baseline
on a padded ``[B, L]`` batch of the same number of tokens (``B = tokens_per_mb / --seq-len``),
bf16 parameters and bf16 AdamW, one process per GPU with no communication. Both accumulate
``--mbs-per-step`` micro-batches per optimizer step. One JSON line per (model, implementation):
tokens/s, ``mfu`` = 6 * N * tokens/s / peak (``--peak-tflops`` per GPU), and ``mfu_attn``, which
adds the causal attention FLOPs of the documents actually trained (6 * L^2 * heads * head_dim per
layer for a document of L tokens: forward QK^T and PV over the causal half, backward twice that),
and ``mfu_attn_full``, which counts attention as PaLM's appendix B and torchtitan do (the whole
L x L matrix, twice the causal half; per document, where torchtitan takes the packed row's length).
``--publish N`` also times N disk weight updates (publish + load into an `hf` runner).

    torchrun --nproc_per_node=1 tools/bench/train.py --engine-variants compiled --warmup 3 --steps 6
    torchrun --nproc_per_node=2 tools/bench/train.py --engine-variants compiled --warmup 3 --steps 6
    python tools/bench/train.py --smoke                                    # CPU, tiny models (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import QWEN25_SHAPES, QWEN25_VOCAB, REPO, TINY_SHAPE, sync

from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
from areal_hpc.train import dist
from areal_hpc.train.batching import collate

QWEN25 = dict(vocab_size=QWEN25_VOCAB, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu")
MODELS = {name: dict(shape, **QWEN25) for name, shape in QWEN25_SHAPES.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--tiny", action="store_true", help="tiny versions of the models, CPU-sized batches")
    p.add_argument("--smoke", action="store_true", help="--tiny, one warm-up and one timed step (CI)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-device peak (H100/H200 dense bf16: 989)")
    p.add_argument("--tokens-per-mb", type=int, default=16384)
    p.add_argument("--mbs-per-step", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048, help="baseline row length")
    p.add_argument("--min-doc", type=int, default=256, help="engine document lengths: uniform in [min, max]")
    p.add_argument("--max-doc", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn-impl", default="varlen", help="engine attention: varlen | sdpa | ...")
    p.add_argument("--ac", default="auto", choices=["auto", "on", "off"],
                   help="activation checkpointing for both implementations (auto: on from 1B parameters)")
    p.add_argument("--impls", default="engine,hf", help="which to run: engine, hf")
    p.add_argument("--engine-variants", default="fused",
                   help="engine runs, comma-separated: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    p.add_argument("--publish", type=int, default=0,
                   help="after the engine's steps, publish the weights this many times (disk, bf16) and load each "
                        "version into an hf engine runner on this GPU; reports publish and load seconds")
    p.add_argument("--gc", default="settled", choices=["settled", "auto", "off"],
                   help="Python's garbage collector during the engine steps: settled (as trainers run it: a "
                        "collection and gc.freeze after the 1st and 3rd steps, dist.SettledGC), auto (as is), or off "
                        "(collected and frozen after the warm-up, then disabled, as torchtitan's gc_freq does)")
    p.add_argument("--sync-debug", action="store_true",
                   help="after the timed steps, run one more step with torch.cuda.set_sync_debug_mode('warn') and "
                        "print where it synchronised with the GPU (count per call site)")
    p.add_argument("--workdir", default="", help="where the random-init models are written (visible to all ranks)")
    a = p.parse_args(argv)
    for key, given, known in (("--models", a.models, MODELS), ("--engine-variants", a.engine_variants, VARIANTS),
                              ("--impls", a.impls, ("engine", "hf"))):
        bad = [x for x in given.split(",") if x.strip() and x.strip() not in known]
        if bad:
            p.error(f"{key}: unknown {', '.join(bad)} (choose from {', '.join(known)})")
    if a.smoke:
        a.tiny, a.steps, a.warmup = True, 1, 1
    if a.tiny:
        for k, v in dict(tokens_per_mb=512, seq_len=128, min_doc=16, max_doc=128, steps=2, warmup=1).items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    return a


def model_config(name: str, tiny: bool):
    from transformers import AutoConfig

    kw = dict(MODELS[name])
    if tiny:
        kw.update(TINY_SHAPE)
    return AutoConfig.for_model("qwen2", **kw)


def count_params(cfg) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mem_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def write_model(cfg, out: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Random-init weights saved as an HF dir (rank 0 of each node; others wait)."""
    from transformers import AutoModelForCausalLM

    if dist.rank() == 0 and not (out / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(str(tmp))
        os.replace(tmp, out)
        del model
        free_memory()
    dist.barrier()


def attn_flops(cfg, lengths) -> float:
    """Training FLOPs of causal attention over documents of these lengths (all layers)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = cfg.num_attention_heads * head_dim
    return 6.0 * cfg.num_hidden_layers * width * sum(n * n for n in lengths)


def engine_batch(args, vocab: int, rank: int, step: int):
    """Documents of random length filling 97% of ``mbs_per_step * tokens_per_mb`` tokens on this rank
    (a little slack lets first-fit-decreasing pack them into ``mbs_per_step`` micro-batches).
    Returns the batch, its token count and the document lengths."""
    rng = random.Random(1000 * step + rank)
    budget, samples, used = int(0.97 * args.tokens_per_mb * args.mbs_per_step), [], 0
    while True:
        n = rng.randint(args.min_doc, args.max_doc)
        if used + n > budget:
            n = budget - used
            if n < 2:
                break
        ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        samples.append({"input_ids": ids, "loss_mask": (torch.arange(n) > 0).long()})
        used += n
    return collate(samples), used, [len(s["input_ids"]) for s in samples]


def result(args, name, impl, n_params, tokens_per_step, times, device, world, extra, attn_per_step=0.0):
    """The JSON line of one run; ``attn_per_step``: attention FLOPs of one step, all ranks."""
    step_s = sum(times) / len(times)
    tps = tokens_per_step / step_s
    per_gpu = tps / world
    peak = args.peak_tflops * 1e12
    return {"bench": "train_throughput", "model": name + ("-tiny" if args.tiny else ""), "impl": impl,
            "world_size": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "n_params": n_params, "tokens_per_step": tokens_per_step, "step_time_s": round(step_s, 4),
            "tokens_per_s": round(tps, 1), "tokens_per_s_per_gpu": round(per_gpu, 1),
            "mfu": round(6 * n_params * per_gpu / peak, 4),
            "mfu_attn": round((6 * n_params * tokens_per_step + attn_per_step) / step_s / world / peak, 4),
            # attention as PaLM and torchtitan count it: the whole L x L score matrix (not halved
            # for causality), per document here (torchtitan takes the row length)
            "mfu_attn_full": round((6 * n_params * tokens_per_step + 2 * attn_per_step) / step_s / world / peak, 4),
            "peak_mem_gib": round(peak_mem_gib(device), 2), **extra}


def use_ac(args, n_params: int) -> bool:
    """``--ac``: on, off, or auto (on from 1B parameters)."""
    return args.ac == "on" or (args.ac == "auto" and n_params >= 1e9)


# engine settings of each --engine-variants name (the rest: EngineConfig's defaults)
VARIANTS = {
    "fused": dict(fsdp_units="layer"),  # eager layers, logprobs from the hidden states, a unit per layer
    # the engine of the documented figures: compiled decoder layers, fused projections, padded
    # micro-batches, kept LM-head logits, fsdp_units=auto (was compiled_pad_fuse_unit)
    "compiled": dict(compile_layers=True, lm_head_keep_logits=True, pad_micro_batches=True, fuse_linears=True,
                     fsdp_units="auto"),
}


def make_engine(args, path, ac: bool, variant: str = "fused"):
    """The FSDP2 engine as benchmarked: ``variant`` one of `VARIANTS` (see --engine-variants)."""
    from areal_hpc.train.engine import FSDPEngine

    if variant not in VARIANTS:
        raise SystemExit(f"unknown engine variant {variant!r} ({', '.join(VARIANTS)})")
    return FSDPEngine(EngineConfig(path=str(path), gradient_checkpointing=ac, attn_impl=args.attn_impl,
                                   optimizer=OptimizerConfig(lr=1e-5, grad_clip=1.0), **VARIANTS[variant]),
                      MicroBatchSpec(max_tokens_per_mb=args.tokens_per_mb, n_mbs=args.mbs_per_step),
                      total_steps=args.warmup + args.steps)


def make_hf(args, cfg, ac: bool, device: torch.device):
    """The baseline: plain transformers model (bf16 on GPU) + AdamW, and its row count per micro-batch."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    return model, opt, max(1, args.tokens_per_mb // args.seq_len)


def hf_step(model, opt, mbs) -> float:
    """One optimizer step of the baseline over padded micro-batches ``mbs``; returns the loss."""
    total = 0.0
    for ids in mbs:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss / len(mbs)
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def bench_publish(args, eng, path, info) -> dict:
    """Disk weight update of the engine's model: publish (gather, cast, write) + load into a runner."""
    import logging
    import shutil

    from areal_hpc.inference.hf_engine.model_runner import ModelRunner, read_checkpoint
    from areal_hpc.train.publish import publish_weights

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("areal_hpc.train.publish").setLevel(logging.INFO)  # gather/write split per version
    root = Path(args.workdir or tempfile.gettempdir()) / f"areal-bench-publish-{os.getpid()}"
    runner = ModelRunner(str(path), max_running=8, context_length=256, cuda_graph=False) if info.rank == 0 else None
    pub, load = [], []
    for v in range(1, args.publish + 1):
        sync(info.device)
        t0 = time.perf_counter()
        out = publish_weights(eng, root, v, tokenizer_src="")
        pub.append(time.perf_counter() - t0)
        if runner is not None:
            t0 = time.perf_counter()
            tensors = read_checkpoint(out)
            runner.load_weights(tensors.items())
            load.append(time.perf_counter() - t0)
    if info.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    del runner
    med = lambda xs: round(sorted(xs)[len(xs) // 2], 3) if xs else None  # noqa: E731
    return {"publish_s_median": med(pub), "load_s_median": med(load), "publish_s": [round(x, 3) for x in pub],
            "load_s": [round(x, 3) for x in load]}


def sync_sites(fn, device: torch.device) -> dict:
    """Run ``fn`` with CUDA sync debugging on: ``{call site: count}`` of its host synchronisations
    (the innermost frame of this repository, else the innermost frame)."""
    import traceback
    import warnings

    if device.type != "cuda":
        return {}
    repo = str(REPO)
    sites: dict = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        ours = [f for f in frames if f.filename.startswith(repo)]
        f = (ours or frames)[-1]
        key = f"{Path(f.filename).name}:{f.lineno} {f.line}"[:160]
        sites[key] = sites.get(key, 0) + 1

    with warnings.catch_warnings():  # restores warnings.showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


class GcPauses:
    """Seconds Python's garbage collector ran, per generation, while installed (``gc.callbacks``)."""

    def __init__(self):
        self.seconds = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._t0

    def take(self) -> list:
        out, self.seconds = [round(x, 4) for x in self.seconds], [0.0, 0.0, 0.0]
        return out


def bench_engine(args, name, cfg, path, n_params, ac, info, variant="fused"):
    from torch._dynamo.utils import counters

    from areal_hpc.train.sft_loss import sft_loss

    eng = make_engine(args, path, ac, variant)
    times, cpu, losses, tokens, attn, n_mbs = [], [], [], 0, 0.0, 0.0
    graphs = counters["stats"]
    pauses, gc_s = GcPauses(), []  # garbage collection inside each timed step, per generation
    settled = dist.SettledGC() if args.gc == "settled" else None
    gc.callbacks.append(pauses)
    for step in range(args.warmup + args.steps):
        batch, used, lengths = engine_batch(args, cfg.vocab_size, info.rank, step)
        sync(info.device)
        if step == args.warmup:
            graphs_before = graphs["unique_graphs"]
            if args.gc == "off":
                gc.collect()
                gc.freeze()
                gc.disable()
        pauses.take()
        t0, c0 = time.perf_counter(), time.thread_time()
        stats = eng.train_batch(batch, sft_loss)
        eng.step_lr_scheduler()
        c1 = time.thread_time()
        sync(info.device)
        if settled:  # between steps, outside the timing, as the trainers' loops do it
            settled.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(c1 - c0)
            gc_s.append(pauses.take())
            tokens = int(dist.all_reduce_scalar(used))
            attn += dist.all_reduce_scalar(attn_flops(cfg, lengths)) / args.steps
            n_mbs = stats["n_mbs"]
        losses.append(stats["loss"])
    gc.callbacks.remove(pauses)
    gc.enable()
    gc.unfreeze()
    syncs = sync_sites(lambda: eng.train_batch(engine_batch(args, cfg.vocab_size, info.rank, 0)[0], sft_loss),
                       info.device) if args.sync_debug else None
    times = [dist.all_reduce_scalar(t, "max") for t in times]
    out = result(args, name, "areal_fsdp", n_params, tokens, times, info.device, info.world_size,
                 {"variant": variant, "fused_lm_head": eng.fused_lm_head, "compile_layers": eng.config.compile_layers,
                  "fsdp_units": eng.config.fsdp_units, "gc": args.gc, "omp_threads": torch.get_num_threads(),
                  "cpu_affinity": len(os.sched_getaffinity(0)),
                  "dtype": str(eng.precision.param_dtype).removeprefix("torch."), "attn_impl": args.attn_impl,
                  "gradient_checkpointing": ac, "n_mbs_per_step": n_mbs,
                  # torch.compile graphs built during the timed steps (a recompilation: a new shape
                  # class; its seconds are in the mean), and each timed step's seconds
                  "graphs_compiled_timed": graphs["unique_graphs"] - graphs_before,
                  "step_times_s": [round(t, 3) for t in times],
                  # this rank's (rank 0's) seconds of garbage collection in each timed step, generations 0/1/2
                  "gc_s_per_step": gc_s,
                  "host_cpu_s_per_step": round(sum(cpu) / len(cpu), 4), **({"syncs": syncs} if syncs else {}),
                  "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}, attn)
    if args.publish:
        out.update(bench_publish(args, eng, path, info))
    del eng
    free_memory()
    return out


def bench_hf(args, name, cfg, n_params, ac, info):
    model, opt, rows = make_hf(args, cfg, ac, info.device)
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(info.rank)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        mbs = [torch.randint(0, cfg.vocab_size, (rows, args.seq_len), generator=g).to(info.device)
               for _ in range(args.mbs_per_step)]
        sync(info.device)
        t0 = time.perf_counter()
        total = hf_step(model, opt, mbs)
        sync(info.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(total)
    times = [dist.all_reduce_scalar(t, "max") for t in times]
    tokens = rows * args.seq_len * args.mbs_per_step * info.world_size
    out = result(args, name, "hf_plain", n_params, tokens, times, info.device, info.world_size,
                 {"dtype": str(dtype).removeprefix("torch."), "attn_impl": "sdpa", "gradient_checkpointing": ac,
                  "note": "independent replica per GPU (no gradient sync)",
                  "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)},
                 attn_flops(cfg, [args.seq_len] * rows * args.mbs_per_step) * info.world_size)
    del model, opt
    free_memory()
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    info = dist.init_distributed()
    if info.device.type == "cpu" and not args.tiny:
        print("no GPU: pass --tiny for the CPU smoke test", file=sys.stderr)
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / f"areal-bench-{os.getuid()}")
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        cfg = model_config(name, args.tiny)
        n_params = count_params(cfg)
        ac = use_ac(args, n_params)
        rows = []
        for impl in impls:
            try:
                if impl == "engine":
                    path = workdir / (name + ("-tiny" if args.tiny else ""))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
                    write_model(cfg, path, dtype, info.device)
                    for variant in [v.strip() for v in args.engine_variants.split(",") if v.strip()]:
                        rows.append(bench_engine(args, name, cfg, path, n_params, ac, info, variant))
                        if info.rank == 0:
                            print(json.dumps(rows[-1]), flush=True)
                elif impl == "hf":
                    rows.append(bench_hf(args, name, cfg, n_params, ac, info))
                else:
                    raise SystemExit(f"unknown impl {impl!r} (engine, hf)")
            except torch.OutOfMemoryError as e:
                free_memory()
                rows.append({"bench": "train_throughput", "model": name, "impl": impl, "error": f"OOM: {e}"[:300]})
        if info.rank == 0:
            for r in rows:
                if r.get("impl") != "areal_fsdp":
                    print(json.dumps(r), flush=True)
    dist.destroy()


if __name__ == "__main__":
    main()
