"""Owns the model and its device: loads weights, runs prefill and decode, captures CUDA graphs.

Works with transformers decoder-only models whose attention calls ``cache.update(k, v, layer)`` (Llama, Qwen2, Qwen3,
Mistral, ... families). The model's own cache classes are not used: the runner passes a `KVCache` with explicit
``position_ids`` and a 4-D boolean attention mask, so sequences of different lengths share one batch unpadded.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence as Seq, Tuple

import torch

from areal_hpc.inference.hf_engine.kv_cache import KVCache, register_attention
from areal_hpc.inference.hf_engine.sequence import Sequence

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    """A torch dtype by its name (``torch.`` prefix optional); ValueError for anything else."""
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def read_checkpoint(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint (a directory, sharded or not, or one safetensors file), on CPU."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        files = [p]
    elif (p / "model.safetensors.index.json").exists():
        index = json.loads((p / "model.safetensors.index.json").read_text())
        files = [p / s for s in sorted(set(index["weight_map"].values()))]
    else:
        files = sorted(p.glob("*.safetensors"))  # none where there is no directory
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(p)!r}")
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f), device="cpu"))
        except Exception as e:  # safetensors' own errors do not say which file
            raise ValueError(f"{f}: {e}") from e
    return out


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout_s: float = 1800.0):
    """The weight-update group as SGLang's server joins it: rendezvous at ``init_method`` (``tcp://host:port``, the
    trainer's store), then `new_process_group`."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import rendezvous

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    return new_process_group(store, rank, world_size, group_name, backend, timeout_s)


def new_process_group(store, rank: int, world_size: int, group_name: str, backend: str, timeout_s: float):
    """A process group that is not the default one, on ``store``, as SGLang builds it for weight updates (trainer
    and servers must agree: ``PrefixStore(group_name, store)``, same name)."""
    from datetime import timedelta

    import torch.distributed as tdist
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    # The default group's bound device (a trainer's) is hidden meanwhile: with one, torch makes a new NCCL group by
    # splitting the default communicator, a collective the servers and the other trainer ranks never join (rank 0
    # hangs). Unbound, the group bootstraps through its own store.
    default = _world.default_pg if tdist.is_initialized() else None
    bound = getattr(default, "bound_device_id", None)
    if bound is not None:
        default.bound_device_id = None
    try:
        pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                          group_name=group_name, timeout=timeout, backend_options=None)
    finally:
        if bound is not None:
            default.bound_device_id = bound
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class ModelRunner:
    def __init__(self, model_path: str, *, dtype: str = "auto", device: str = "auto",
                 max_running: int = 256, context_length: int = 4096, mem_fraction_static: float = 0.8,
                 cuda_graph: bool = True, seed: int = 1, decode_mode: str = "auto"):
        """``decode_mode``: ``eager`` (growing KV cache, exact shapes: the CPU default), ``graph`` (fixed buffers,
        bucketed batches replayed from CUDA graphs: the GPU default unless ``cuda_graph=False``), ``static`` (the graph
        path's buffers and buckets without graphs, so it runs, and is tested, on CPU)."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.model_path = model_path
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if dtype in ("auto", "", None):
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        self.dtype = torch_dtype(dtype)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, attn_implementation=register_attention()).to(self.device).eval()
        self.model.requires_grad_(False)
        self.config = self.model.config
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        # what the model's own head does to the lm_head's logits: Granite divides, Cohere multiplies
        self.logit_scale = getattr(self.config, "logit_scale", None) or 1 / getattr(self.config, "logits_scaling", 1)
        self.cache_kw = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        text_cfg = self.config.get_text_config()
        max_pos = getattr(text_cfg, "max_position_embeddings", None) or context_length
        self.context_length = int(min(context_length, max_pos)) if context_length > 0 else int(max_pos)
        window, types = getattr(text_cfg, "sliding_window", None), getattr(text_cfg, "layer_types", None) or ()
        if (window and getattr(text_cfg, "use_sliding_window", True) and self.context_length > window
                and (not types or "sliding_attention" in types)):  # the masks here are causal: within it only
            log.warning("context length %d capped at the sliding window %d", self.context_length, window)
            self.context_length = int(window)
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.eos_token_ids = self._eos_ids(self.config, model_path)
        n_layers, n_heads = text_cfg.num_hidden_layers, text_cfg.num_attention_heads
        n_kv = getattr(text_cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // n_heads
        self.max_running = int(max_running)
        if decode_mode == "auto":
            decode_mode = "graph" if self.device.type == "cuda" and cuda_graph else "eager"
        if decode_mode not in ("eager", "static", "graph"):
            raise ValueError(f"decode_mode must be auto, eager, static or graph, not {decode_mode!r}")
        if decode_mode == "graph" and self.device.type != "cuda":
            raise ValueError("decode_mode graph needs a CUDA device")
        self.decode_mode = decode_mode
        # every name a checkpoint may use: parameters (tied ones under each name) and persistent buffers
        self._params = dict(self.model.state_dict(keep_vars=True))
        # where transformers converts a checkpoint (a MoE layer's experts fused): checkpoint name -> (parameter, shape),
        # and where in it the part lies, (strides, offset), None where it is no strided view (see _map_parts)
        self._parts: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
        self._views: Dict[str, Tuple[Tuple[int, ...], int] | None] = {}
        with contextlib.suppress(ImportError):  # transformers 4: the modules hold the checkpoint's layout
            self._map_parts()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # _map_parts' indices: gone before the KV cache is sized
            self.max_running = self._plan_gpu_rows(n_layers, n_kv, head_dim, mem_fraction_static)
        fixed = self.device.type == "cuda" or decode_mode != "eager"  # allocated once, at full size
        self.kv = KVCache(n_layers, n_kv, head_dim, self.dtype, self.device,
                          self.max_running if fixed else min(16, self.max_running),
                          self.context_length if fixed else min(256, self.context_length),
                          self.max_running, self.context_length)
        self.static = StaticDecoder(self, use_graphs=decode_mode == "graph") if decode_mode != "eager" else None

    def _map_parts(self) -> None:
        """Fill ``_parts`` and ``_views``. A part's elements are found by converting an index of every element of its
        parameter; where they are those of one strided view of it (the index equals that view of the index), the view
        is kept, which the broadcast writes into, and no index."""
        from transformers.core_model_loading import revert_weight_conversion

        meta = {name: torch.empty(p.shape, dtype=p.dtype, device="meta") for name, p in self._params.items()}
        kept = revert_weight_conversion(self.model, meta)  # one call: a dense model keeps every name
        for name in meta.keys() - kept.keys():
            p = self._params[name]
            index = torch.arange(p.numel(), device=self.device, dtype=torch.int32 if p.numel() < 2**31 else None)
            for k, idx in revert_weight_conversion(self.model, {name: index.view(p.shape)}).items():
                if k == name:
                    continue
                self._parts[k] = (name, tuple(idx.shape))
                self._views[k] = None
                if not idx.numel() or not p.is_contiguous():
                    continue
                # the offset and strides a view would have: the index's first element, its next along each dimension
                ndim = idx.dim()
                first = int(idx[(0,) * ndim])
                strides = [int(idx[(0,) * d + (1,) + (0,) * (ndim - d - 1)]) - first if n > 1 else 1
                           for d, n in enumerate(idx.shape)]
                last = first + sum((n - 1) * st for n, st in zip(idx.shape, strides))  # within the parameter?
                if (min(strides, default=1) > 0 and last < p.numel()
                        and torch.equal(index.as_strided(idx.shape, strides, first), idx)):
                    self._views[k] = (tuple(strides), first)

    @staticmethod
    def _eos_ids(config, model_path: str) -> Tuple[int, ...]:
        found = [getattr(config, "eos_token_id", None)]
        with contextlib.suppress(Exception):  # no generation_config.json: the model config is enough
            from transformers import GenerationConfig

            found.append(GenerationConfig.from_pretrained(model_path).eos_token_id)
        return tuple(sorted({int(x) for e in found for x in ([e] if isinstance(e, int) else e or ())}))

    def _plan_gpu_rows(self, n_layers: int, n_kv: int, head_dim: int, mem_fraction: float) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        elem = torch.finfo(self.dtype).bits // 8
        per_row = 2 * n_layers * n_kv * head_dim * elem * self.context_length
        reserve = self.max_running * self.vocab_size * 4 * 6 + (1 << 30)  # logits/sampling + activations
        budget = int(total * mem_fraction) - (total - free) - reserve
        rows = min(self.max_running, max(0, budget // per_row))
        if rows < 1:
            raise MemoryError(
                f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f}, "
                f"mem_fraction_static={mem_fraction}; lower context_length or max_running_requests")
        if rows < self.max_running:
            log.warning("KV cache fits %d running sequences of %d tokens (asked %d)", rows,
                        self.context_length, self.max_running)
        return int(rows)

    # ------------------------------------------------------------------ forward passes
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.logit_scale != 1:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self.cache_kw: self.kv}).last_hidden_state

    @torch.inference_mode()
    def prefill(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """Run the whole token list of each sequence (rows ``seqs[0].slot ..``, contiguous); returns next-token logits
        [n, vocab] float32."""
        n = len(seqs)
        row0 = seqs[0].slot
        length = max(s.num_tokens for s in seqs)
        self.kv.ensure(row0 + n, length + 1)
        # identical token lists (the n samples of one prompt) are run once, then copied to their rows
        first: Dict[Tuple[int, ...], int] = {}
        which = [first.setdefault(tuple(s.prompt_ids + s.output_ids), len(first)) for s in seqs]
        u = len(first)
        rows = [list(t) + [0] * (length - len(t)) for t in first]
        dev = self.device
        ids = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
        lens_t = torch.tensor([len(t) for t in first], dtype=torch.long).to(dev, non_blocking=True)
        ar = torch.arange(length, device=dev)
        # causal within each row, and never attending to the right padding of a row
        mask = (ar[:, None] >= ar[None, :])[None, None] & (ar[None, None, None, :] < lens_t[:, None, None, None])
        self.kv.begin_prefill(row0)
        hidden = self._forward(ids, mask, ar[None, :].expand(u, length))
        logits = self._logits(hidden[torch.arange(u, device=dev), lens_t - 1])
        if u == n:
            return logits
        idx = torch.tensor(which, dtype=torch.long, device=dev)
        if any(len(s.output_ids) + 1 < s.params.max_new_tokens for s in seqs):  # the copies decode on: KV rows
            self.kv.spread_rows(row0, idx, length)
        return logits[idx]

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """One token for every running sequence (rows ``0 .. n``); returns logits [n, vocab]."""
        n = len(seqs)
        toks = [s.output_ids[-1] if s.output_ids else s.prompt_ids[-1] for s in seqs]
        pos = [s.num_tokens - 1 for s in seqs]
        width = max(pos) + 1
        if self.static is not None:
            return self.static.run(n, width, toks, pos)
        self.kv.ensure(n, width)
        ids = torch.tensor(toks, dtype=torch.long).to(self.device, non_blocking=True)
        pos_t = torch.tensor(pos, dtype=torch.long).to(self.device, non_blocking=True)
        return self._decode_step(ids[:, None], pos_t, width)

    def _decode_step(self, ids: torch.Tensor, pos: torch.Tensor, width: int) -> torch.Tensor:
        """Row ``i`` takes token ``ids[i]`` at ``pos[i]``, attending to its first ``width`` columns up to ``pos[i]``."""
        self.kv.begin_decode(pos, width)
        mask = (torch.arange(width, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        return self._logits(self._forward(ids, mask, pos[:, None])[:, -1])

    @torch.inference_mode()
    def move_rows(self, moves: Seq[Tuple[int, int, int]]) -> None:
        self.kv.move_rows(moves)

    @property
    def cuda_graphs(self) -> bool:
        return bool(self.static is not None and self.static.use_graphs)

    def release_memory(self) -> None:
        """Shrink the CPU KV cache back to its initial size (nothing may be running)."""
        if self.static is None and self.device.type != "cuda":
            self.kv.reset()

    # ------------------------------------------------------------------ weights
    def read_weights(self, path: str) -> Dict[str, torch.Tensor]:
        """A checkpoint's tensors (`read_checkpoint`) under this model's names. Where they differ (transformers 5 holds
        a MoE layer's experts fused, checkpoints name each one), transformers loads and converts the checkpoint."""
        tensors = read_checkpoint(path)
        if all(name in self._params for name in tensors) or not (Path(path) / "config.json").exists():
            return tensors
        from transformers import AutoModelForCausalLM

        converted = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).state_dict()
        return converted if all(name in self._params for name in converted) else tensors

    def check_weights(self, names_shapes: Iterable[Tuple[str, Tuple[int, ...]]], whole: bool = True) -> List[str]:
        """Problems that would make loading these tensors fail, or (``whole``) leave the model partial."""
        problems: List[str] = []
        seen = set()
        for name, shape in names_shapes:
            p = self._params.get(name)
            if p is None and name not in self._parts:
                problems.append(f"unexpected tensor {name!r}")
                continue
            # a part of a converted parameter is seen by its name: the parameter is whole once all its parts are
            want = tuple(p.shape) if p is not None else self._parts[name][1]
            if tuple(shape) != want:
                problems.append(f"{name}: shape {tuple(shape)} != model's {want}")
            seen.add(id(p) if p is not None else name)
        whole_parts = {n for n, _ in self._parts.values()} - {n for k, (n, _) in self._parts.items() if k not in seen}
        missing = sorted({n for n, p in self._params.items() if id(p) not in seen and n not in whole_parts})
        if missing and whole:
            problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        return problems

    @torch.inference_mode()
    def load_weights(self, tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the parameters in place (CUDA graphs stay valid)."""
        for name, t in tensors:
            self._params[name].copy_(t, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def load_broadcast(self, specs: Seq[Tuple[str, torch.dtype, Tuple[int, ...]]], group,
                       gone: Callable[[], bool] = lambda: False, discard: bool = False) -> None:
        """Receive tensors ``(name, dtype, shape)``, in this order, broadcast by rank 0 of ``group``, into the
        parameters (in place, as `load_weights`), or (``discard``) into scratch memory, one at a time, and dropped.
        `ConnectionAbortedError` once ``gone()`` says the sender went away: else it is waited for until the timeout."""
        import torch.distributed as dist

        def finish(work) -> None:
            while not work.is_completed():
                if gone():
                    raise ConnectionAbortedError("the trainer went away in the middle of the broadcast")
                time.sleep(0.001)
            work.wait()  # raises a failed op's error; NCCL: the current stream waits for it

        works, where = [], {}  # where: a converted parameter's element indices of each of its parts, if not a view
        for name, dtype, shape in specs:
            param = None if discard else self._params.get(name)
            direct = param is not None and param.dtype == dtype and param.is_contiguous()
            buf = param.data if direct else torch.empty(shape, dtype=dtype, device=self.device)
            works.append(dist.broadcast(buf, src=0, group=group, async_op=True))
            if not direct:
                finish(works[-1])
                if param is not None:
                    param.copy_(buf)
                elif not discard and self._views[name] is not None:  # a part of a converted parameter
                    whole, part_shape = self._parts[name]  # (an expert's gate_proj: a view of gate_up_proj)
                    p, (strides, offset) = self._params[whole].data, self._views[name]
                    p.as_strided(part_shape, strides, p.storage_offset() + offset).copy_(buf)
                elif not discard:  # one that is no view of its parameter
                    whole = self._parts[name][0]
                    if whole not in where:
                        from transformers.core_model_loading import revert_weight_conversion

                        p = self._params[whole]
                        where[whole] = revert_weight_conversion(self.model, {whole: torch.arange(
                            p.numel(), device=self.device).view(p.shape)})
                    p = self._params[whole].data
                    p.view(-1).index_copy_(0, where[whole][name].reshape(-1), buf.reshape(-1).to(p.dtype))
        for work in works:  # the ops of one group complete in order: one wait for the whole bucket
            finish(work)


def _buckets(limit: int, base: Seq[int]) -> List[int]:
    return sorted({b for b in base if b <= limit} | {limit})


class StaticDecoder:
    """Decode steps on fixed buffers: the batch is padded up to a bucket size and attention runs over a bucketed width,
    so each (batch, width) pair is one fixed-shape computation, captured once as a CUDA graph with ``use_graphs``.
    Padding rows write one key into free KV rows at column 0; their logits are ignored. A capture failure turns graphs
    off (logged) and decoding goes on eagerly on the same buffers."""

    def __init__(self, runner: ModelRunner, use_graphs: bool):
        self.r, self.use_graphs = runner, use_graphs
        dev = runner.device
        rows = runner.kv.rows
        self.batch_buckets = _buckets(rows, [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128] + list(range(160, rows + 1, 32)))
        self.width_buckets = _buckets(runner.kv.cols, [128 * 2 ** i for i in range(16)])
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.graphs: Dict[Tuple[int, int], Tuple["torch.cuda.CUDAGraph", torch.Tensor]] = {}
        self.pool = None

    @staticmethod
    def _pick(buckets: List[int], x: int) -> int:
        return buckets[min(bisect.bisect_left(buckets, x), len(buckets) - 1)]

    def _step(self, b: int, w: int) -> torch.Tensor:
        return self.r._decode_step(self.ids[:b], self.pos[:b], w)

    def _capture(self, b: int, w: int) -> Tuple["torch.cuda.CUDAGraph", torch.Tensor]:
        dev = self.r.device
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on the real inputs: rewrites the same KV entries
                self._step(b, w)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._step(b, w)
        self.pool = graph.pool()
        return graph, out

    def run(self, n: int, width: int, toks: List[int], pos: List[int]) -> torch.Tensor:
        b = self._pick(self.batch_buckets, n)
        w = self._pick(self.width_buckets, width)
        pad = b - n
        self.ids[:b, 0].copy_(torch.tensor(toks + [0] * pad, dtype=torch.long), non_blocking=True)
        self.pos[:b].copy_(torch.tensor(pos + [0] * pad, dtype=torch.long), non_blocking=True)
        if not self.use_graphs:
            return self._step(b, w)[:n]
        entry = self.graphs.get((b, w))
        if entry is None:
            try:
                entry = self._capture(b, w)
            except Exception as e:  # graphs are an optimisation: fall back, say why
                log.warning("CUDA graph capture failed for batch %d width %d (%s: %s); decoding without graphs",
                            b, w, type(e).__name__, e)
                self.use_graphs = False
                torch.cuda.synchronize(self.r.device)
                return self._step(b, w)[:n]
            self.graphs[(b, w)] = entry
        graph, out = entry
        graph.replay()
        return out[:n]
