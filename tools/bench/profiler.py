#!/usr/bin/env python
"""Where the time goes: torch.profiler tables for one training step and for decode steps.

    python tools/bench/profiler.py train  [--model qwen2.5-0.5b] [--impl engine|hf] [--variant compiled]
    python tools/bench/profiler.py decode [--batch 64]
    python tools/bench/profiler.py --smoke                 # both on CPU with tiny models (CI)

``train``: the FSDP2 engine (or plain transformers) on the same packed/padded batches as
`train.py`; after warm-up steps, one step under the profiler; prints the top kernels
by device time, the step's wall time and how much of it the GPU was busy. ``decode``: the
`hf` engine's decode path for a Qwen2.5-0.5B-shaped model: the time of one graph replay, of the
sampler, of a whole engine step, then a profiler table of a few engine steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import common
import train as tt


def table(prof, n: int = 25) -> str:
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=70)


def gpu_busy_s(prof) -> float:
    """Sum of device kernel time (overlaps counted twice, so an upper bound of busy time)."""
    total = 0.0
    for e in prof.events():
        on_device = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        if on_device and not getattr(e, "is_user_annotation", False):  # not record_function spans
            total += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    return total / 1e6


def device_intervals(prof) -> list:
    """(start, end) in us of every kernel and copy on the device, sorted. Not the device-side spans
    of ``record_function`` ranges (user annotations such as ``areal.forward`` or
    ``FSDP::pre_forward``): they cover the GPU's idle time inside the range too."""
    cuda = torch.autograd.DeviceType.CUDA
    return sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                  if getattr(e, "device_type", None) == cuda and e.time_range.end > e.time_range.start
                  and not getattr(e, "is_user_annotation", False))


def busy_and_gaps(intervals: list, begin: float, end: float) -> tuple:
    """Busy time (the union of ``intervals``, overlaps counted once) and the idle gaps between
    ``begin`` and ``end``."""
    busy, gaps, cursor = 0.0, [], begin
    for s, e in intervals:
        if s > cursor:
            gaps.append((cursor, s))
        if e > cursor:
            busy += e - max(s, cursor)
            cursor = e
    if end > cursor:
        gaps.append((cursor, end))
    return busy, gaps


def idle_gaps(prof, top: int = 20, min_us: float = 50.0) -> dict:
    """Where the GPU waited during the profiled step: device activity (kernels, copies) against
    the span of the profile; every gap of at least ``min_us`` is labelled with the engine phase
    (``areal.*`` record_function ranges) and the innermost host op running at its middle, and the
    idle time is summed per label. Answers "is the step bound by the host, and where"."""
    dev = device_intervals(prof)
    host = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU]
    if not dev or not host:
        return {}
    begin = min(e.time_range.start for e in host)
    end = max(max(e.time_range.end for e in host), dev[-1][1])
    busy, gaps = busy_and_gaps(dev, begin, end)

    def label(t: float) -> str:
        live = [e for e in host if e.time_range.start <= t <= e.time_range.end]
        phase = [e.name for e in live if e.name.startswith("areal.")]
        ops = sorted((e for e in live if not e.name.startswith(("areal.", "ProfilerStep", "## "))),
                     key=lambda e: e.time_range.end - e.time_range.start)
        return f"{phase[-1] if phase else '-'} | {ops[0].name[:60] if ops else '-'}"

    phases = [e for e in host if e.name.startswith("areal.")]
    per_label: dict = {}
    per_phase: dict = {}
    listed = []
    for s, e in gaps:
        mid = (s + e) / 2
        phase = ([p.name for p in phases if p.time_range.start <= mid <= p.time_range.end] or ["-"])[-1]
        per_phase[phase] = per_phase.get(phase, 0.0) + (e - s) / 1e3
        if e - s < min_us:
            continue
        lab = label(mid)
        per_label[lab] = per_label.get(lab, 0.0) + (e - s) / 1e3
        listed.append((round((e - s) / 1e3, 3), round((s - begin) / 1e3, 1), lab))
    idle = sum(e - s for s, e in gaps)
    return {"span_ms": round((end - begin) / 1e3, 2), "busy_ms": round(busy / 1e3, 2),
            "idle_ms": round(idle / 1e3, 2), "gaps_over_min": len(listed),
            "idle_small_gaps_ms": round((idle - sum(g[0] for g in listed) * 1e3) / 1e3, 2),
            "idle_ms_by_phase": {k: round(v, 2) for k, v in sorted(per_phase.items(), key=lambda kv: -kv[1])},
            "idle_ms_by_label": {k: round(v, 2) for k, v in sorted(per_label.items(), key=lambda kv: -kv[1])[:top]},
            "largest_gaps_ms_at_ms_label": sorted(listed, reverse=True)[:top]}


def profiled(fn, device: torch.device, host: bool = True):
    """``fn`` under the profiler: host ops and device activity, or (``host=False``) device
    activity only, which leaves the host's speed as it is without the profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = ([ProfilerActivity.CPU] if host else []) + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tt.sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        tt.sync(device)
        wall = time.perf_counter() - t0
    return prof, wall


def cmd_train(a) -> None:
    from areal_hpc.train import dist
    from areal_hpc.train.sft_loss import sft_loss

    targs = tt.parse_args(["--models", a.model, "--tokens-per-mb", str(a.tokens_per_mb), "--ac", a.ac,
                           "--attn-impl", a.attn_impl] + (["--tiny"] if a.tiny else []))
    info = dist.init_distributed()
    cfg = tt.model_config(a.model, a.tiny)
    n_params = tt.count_params(cfg)
    ac = tt.use_ac(targs, n_params)
    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    path = Path(tempfile.gettempdir()) / f"areal-prof-{a.model}{'-tiny' if a.tiny else ''}"
    tt.write_model(cfg, path, dtype, info.device)
    if a.impl == "engine":
        eng = tt.make_engine(targs, path, ac, a.variant)

        batches = {}

        def step(i: int):
            batch, used, _ = batches.pop(i, None) or tt.engine_batch(targs, cfg.vocab_size, info.rank, i)
            eng.train_batch(batch, sft_loss)
            return used

    else:
        model, opt, rows = tt.make_hf(targs, cfg, ac, info.device)

        def step(i: int):
            tt.hf_step(model, opt, [torch.randint(0, cfg.vocab_size, (rows, targs.seq_len), device=info.device)
                                    for _ in range(targs.mbs_per_step)])
            return rows * targs.seq_len * targs.mbs_per_step

    n_warm = a.warmup + (2 if a.variant.startswith("compiled") else 0)  # compiling takes a step or two
    if a.impl == "engine":  # the profiled steps' batches are made before, outside the profile
        batches.update({i: tt.engine_batch(targs, cfg.vocab_size, info.rank, i) for i in (n_warm, n_warm + 1)})
    for i in range(n_warm):
        step(i)
    box = {}
    prof, wall = profiled(lambda: box.setdefault("used", step(n_warm)), info.device)
    if info.rank == 0:
        print(table(prof, a.rows))
        busy = gpu_busy_s(prof)
        print(json.dumps({"bench": "profile_train", "model": a.model, "impl": a.impl, "variant": a.variant,
                          "attn_impl": a.attn_impl,
                          "ac": ac, "wall_s": round(wall, 4), "tokens": box["used"],
                          "tokens_per_s": round(box["used"] / wall, 1),
                          "mfu": round(6 * n_params * box["used"] / wall / (a.peak_tflops * 1e12), 4),
                          "gpu_kernel_s": round(busy, 4)}), flush=True)
        print(json.dumps({"bench": "profile_gaps", "model": a.model, "variant": a.variant, **idle_gaps(prof)}),
              flush=True)
    if info.device.type == "cuda":  # the same without host-side tracing (which slows the host)
        prof, wall = profiled(lambda: step(n_warm + 1), info.device, host=False)
        dev = device_intervals(prof)
        busy, gaps = busy_and_gaps(dev, dev[0][0], dev[-1][1]) if dev else (0.0, [])
        big = sorted(((e - s) / 1e3, (s - dev[0][0]) / 1e3) for s, e in gaps if e - s >= 50)
        if info.rank == 0:
            print(json.dumps({"bench": "profile_device_only", "model": a.model, "variant": a.variant,
                              "wall_ms": round(wall * 1e3, 2), "busy_ms": round(busy / 1e3, 2),
                              "idle_ms": round(wall * 1e3 - busy / 1e3, 2),
                              "idle_between_kernels_ms": round(sum(e - s for s, e in gaps) / 1e3, 2),
                              "gaps_over_50us": len(big), "idle_in_them_ms": round(sum(g for g, _ in big), 2),
                              "largest_gaps_ms_at_ms": [(round(g, 3), round(t, 1)) for g, t in big[::-1][:15]]}),
                  flush=True)
    dist.destroy()


def cmd_decode(a) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from areal_hpc.inference.hf_engine import LLMEngine, ModelRunner, SamplingParams, Sequence
    from areal_hpc.inference.hf_engine.sampler import sample

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dims = dict(common.QWEN25_SHAPES["qwen2.5-0.5b"], vocab_size=common.QWEN25_VOCAB)
    if a.tiny:
        dims = common.TINY_SHAPE
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = AutoConfig.for_model("qwen2", max_position_embeddings=32768, tie_word_embeddings=True, **dims)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(tmp)
        runner = ModelRunner(tmp, device=dev, max_running=a.batch, context_length=1024,
                             decode_mode="graph" if dev == "cuda" else "static")
        engine = LLMEngine(runner).start()
        b, vocab = a.batch, dims["vocab_size"]
        params = SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0, ignore_eos=True)
        import threading

        done, all_done = [], threading.Event()

        def finished(s):
            done.append(s)
            if len(done) == b:
                all_done.set()

        seqs = [Sequence([int(x) for x in torch.randint(10, vocab, (a.prompt_len,))], params, on_finish=finished)
                for _ in range(b)]
        for s in seqs:
            engine.submit(s)
        all_done.wait()
        stats0 = dict(engine.stats)
        # the same batch again, timed: prefill + new_tokens decode steps
        done.clear()
        all_done.clear()
        seqs = [Sequence(list(s.prompt_ids), params, on_finish=finished) for s in seqs]
        sync()
        t0 = time.perf_counter()
        for s in seqs:
            engine.submit(s)
        all_done.wait()
        e2e = time.perf_counter() - t0
        steps = engine.stats["decode_steps"] - stats0["decode_steps"]
        engine.stop()
        # pieces of one decode step, at the width the last steps used
        st = runner.static
        width = a.prompt_len + a.new_tokens
        toks = [1] * b
        pos = [width - 1] * b
        for _ in range(3):
            logits = st.run(b, width, toks, pos)
        sync()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            logits = st.run(b, width, toks, pos)
        sync()
        t_forward = (time.perf_counter() - t0) / n
        plist = [params] * b
        t0 = time.perf_counter()
        for _ in range(n):
            sample(logits, plist)
        t_sample = (time.perf_counter() - t0) / n
        prof, wall = profiled(lambda: [sample(st.run(b, width, toks, pos), plist) for _ in range(10)],
                              runner.device)
        print(table(prof, a.rows))
        print(json.dumps({"bench": "profile_decode", "batch": b, "width": width, "cuda_graph": runner.cuda_graphs,
                          "engine_tok_s": round(b * a.new_tokens / e2e, 1), "engine_step_ms": round(1e3 * e2e / steps, 3),
                          "forward_ms": round(1e3 * t_forward, 3), "sample_ms": round(1e3 * t_sample, 3),
                          "profiled_10_steps_ms": round(1e3 * wall, 2),
                          "gpu_kernel_ms_per_step": round(1e3 * gpu_busy_s(prof) / 10, 3)}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["train", "decode"], help="(both with --smoke)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU)")
    p.add_argument("--smoke", action="store_true", help="train and decode, --tiny, 5 table rows (CI)")
    p.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--impl", default="engine", choices=["engine", "hf"])
    p.add_argument("--attn-impl", default="varlen")
    p.add_argument("--variant", default="fused", choices=list(tt.VARIANTS),
                   help="engine variant (see train.py --engine-variants)")
    p.add_argument("--ac", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--tokens-per-mb", type=int, default=16384)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    a = p.parse_args(argv)
    if a.what is None and not a.smoke:
        p.error("say train or decode (or --smoke)")
    if a.smoke:
        a.tiny, a.rows, a.warmup, a.batch = True, 5, 1, 4
    for what in ("train", "decode") if a.smoke else (a.what,):
        if a.tiny and what == "train" and a.tokens_per_mb == 16384:
            a.tokens_per_mb = 512
        if a.tiny and what == "decode":
            a.prompt_len, a.new_tokens = min(a.prompt_len, 8), min(a.new_tokens, 8)
        cmd_train(a) if what == "train" else cmd_decode(a)


if __name__ == "__main__":
    main()
