"""FSDP2 training engine for any transformers causal LM. Every method that touches the model is collective.

``loss_fn(out, mb) -> (loss, stats)``: ``out`` holds the micro-batch's per-token ``logprobs`` and ``entropy``
(``[T]``); ``loss`` and ``stats`` are means over the micro-batch, finite also without loss tokens (dummy micro-batches).
``loss_weight_fn(mb)`` weighs it (default: loss tokens); the engine computes ``sum_mb loss_mb * w_mb / sum_global w``.
A non-finite gradient norm skips the step."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR
from torch.profiler import record_function

from areal_hpc import toy
from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
from areal_hpc.train import dist, packed_attention, parallel
from areal_hpc.train.batching import Batch, MicroBatch, async_to_device, make_micro_batches, unpack_to_padded
from areal_hpc.train.logprob import install_logprob_forward, packed_token_logprobs

log = logging.getLogger(__name__)

LossFn = Callable[[Dict[str, torch.Tensor], Dict[str, torch.Tensor]], Tuple[torch.Tensor, Dict[str, Any]]]
WeightFn = Callable[[Dict[str, torch.Tensor]], Any]


def loss_token_count(mb: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The default loss weight: the number of tokens with ``loss_mask`` set."""
    return mb["loss_mask"].float().sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` where the float ``mask`` is 1; 0 for an empty mask (a dummy micro-batch)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused on GPU, so `_optimizer_step` skips a step without a host sync."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused, foreach=not fused)


def lr_lambda(cfg: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at a step: linear warm-up, then constant or cosine to ``min_lr_ratio``."""
    warmup = max(0, int(cfg.warmup_steps))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of all gradients (sharded ones included), as a plain tensor on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    return total.full_tensor() if isinstance(total, DTensor) else total


def clip_grads(params: Iterable[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm,
                                             total_norm, foreach=True)


class FSDPEngine:
    """A causal LM sharded with FSDP2 over all ranks of the default process group."""

    def __init__(self, config: EngineConfig, mb_spec: MicroBatchSpec, total_steps: int,
                 trainable: bool = True):
        self.config, self.mb_spec, self.trainable = config, mb_spec, trainable
        self.total_steps = int(total_steps)
        self.info = dist.init_distributed()
        self.device = self.info.device
        self.precision = parallel.resolve_precision(config.dtype, self.device)
        self.model_path = toy.resolve_model(config.path)
        self.mesh = init_device_mesh(self.device.type, (self.info.world_size,), mesh_dim_names=("dp",))
        self.model = self._build_model()
        self.hf_config = self.model.config
        why_not = install_logprob_forward(self.model, config.lm_head_keep_logits) if config.fused_lm_head else "off"
        if config.fused_lm_head and why_not:
            log.info("engine.fused_lm_head: %s; logprobs are computed from the logits", why_not)
        self.fused_lm_head = not why_not
        self.pad_token_id = int(getattr(self.hf_config, "pad_token_id", None) or 0)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.lr_scheduler = None
        if trainable:
            self.optimizer = build_optimizer(self.model.parameters(), config.optimizer)
            self.lr_scheduler = LambdaLR(self.optimizer, lr_lambda(config.optimizer, self.total_steps))
        else:
            self.model.requires_grad_(False)
        self._version = 0
        self._staging: Optional[torch.Tensor] = None  # host buffer of state_dict_for_hf

    def _build_model(self) -> torch.nn.Module:
        """Rank 0 reads the checkpoint; the others build on the meta device and get the weights from rank 0 after
        sharding (one read of the files)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        rank, world = self.info.rank, self.info.world_size
        kwargs = dict(dtype=torch.float32, attn_implementation=packed_attention.resolve_impl(self.config.attn_impl))
        if self.config.attn_impl in packed_attention.ALIASES:
            packed_attention.probe(self.device, self.precision.param_dtype)
        full_sd: Dict[str, torch.Tensor] = {}
        buffers: Dict[str, torch.Tensor] = {}
        if rank == 0:
            model = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs)
            full_sd = model.state_dict()
            buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        else:
            hf_cfg = AutoConfig.from_pretrained(self.model_path)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_cfg, **kwargs)
        model.config.use_cache = False
        if self.config.gradient_checkpointing and self.trainable:  # non-reentrant: parameter names unchanged
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.config.compile_layers and self.device.type == "cuda":
            parallel.compile_layers(model, dynamic=None if self.config.pad_micro_batches else True,
                                    fuse_linears=self.config.fuse_linears)
        n_params = sum(p.numel() for p in model.parameters())
        self.fsdp_units = parallel.resolve_fsdp_units(self.config.fsdp_units, world, n_params,
                                                      dist.device_memory_bytes(self.device), dist.ranks_on_one_host)
        if rank == 0:
            log.info("FSDP units: %s (engine.fsdp_units=%s, %d ranks, %.2fB parameters)", self.fsdp_units,
                     self.config.fsdp_units, world, n_params / 1e9)
        per_layer = self.fsdp_units == "layer"
        # one rank, or one unit: the gathered weights stay for the whole step, gradients summed locally
        self._hold_weights = world == 1 or not per_layer
        parallel.apply_fsdp(model, self.mesh, self.precision, reshard_after_forward=not self._hold_weights,
                            per_layer=per_layer)
        if world == 1:
            model.to(self.device)
        else:
            model.to_empty(device=self.device)
            set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))
            for name, buf in model.named_buffers():  # non-persistent buffers (rotary inv_freq ...)
                if rank == 0:
                    buf.copy_(buffers[name].to(buf.device))
                tdist.broadcast(buf, src=0)
        return model

    def set_version(self, version: int) -> None:
        self._version = int(version)

    def get_version(self) -> int:
        return self._version

    def _set_training(self, training: bool) -> None:
        """``model.train()`` / ``eval()`` only when the mode changes (either walks every module)."""
        if self.model.training != training:
            self.model.train(training)

    def micro_batches(self, batch: Batch) -> List[MicroBatch]:
        return make_micro_batches(batch, self.mb_spec.max_tokens_per_mb, self.mb_spec.n_mbs,
                                  pad_token_id=self.pad_token_id, pad=self.config.pad_micro_batches,
                                  share=self.config.share_stems)

    def _run(self, mb: MicroBatch, temperature: float, with_entropy: bool) -> Dict[str, torch.Tensor]:
        ids = mb.data["input_ids"]
        stems = mb.stems  # the model runs on the distinct stems; `src` spreads their outputs back
        run_ids, run_pos, cu_seqlens = (stems.input_ids, stems.position_ids, stems.cu_seqlens) if stems else (
            ids, mb.data["position_ids"], mb.cu_seqlens)
        extra = {}
        if self.config.attn_impl in packed_attention.ALIASES:  # document boundaries for varlen attention
            cu = async_to_device(cu_seqlens.to(torch.int32), ids.device)
            # padded micro-batches pass a constant as the longest document: one value fewer that varies in compiled code
            max_len = mb.n_tokens if self.config.pad_micro_batches else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
        inputs = dict(input_ids=run_ids.unsqueeze(0), position_ids=run_pos.unsqueeze(0),
                      attention_mask=None, use_cache=False, **extra)
        starts = mb.doc_starts(ids.device)
        src = stems.src if stems else None
        if self.fused_lm_head:
            logp, ent = self.model(**inputs, logprobs_of=(ids, starts, src, temperature, with_entropy))
        else:
            logits = self.model(**inputs).logits[0]
            logp, ent = packed_token_logprobs(logits if src is None else logits[src], ids, starts, temperature,
                                              with_entropy)
        return {"logprobs": logp} if ent is None else {"logprobs": logp, "entropy": ent}

    @torch.no_grad()
    def forward(self, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
        """Per-token logprobs ``[B, L]`` (CPU, fp32): entry t is log p(token t | tokens < t) under
        ``logits / temperature``; 0 at each sequence's first token and at padding."""
        self._set_training(False)
        mbs = self.micro_batches(batch)
        outs = [self._run(mb.to(self.device), temperature, False)["logprobs"] for mb in mbs]
        return unpack_to_padded(outs, mbs, batch)

    def _forward_backward(self, batch: Batch, loss_fn: LossFn, loss_weight_fn: WeightFn, temperature: float,
                          backward: bool = True) -> "_Pending":
        """`forward_backward`, statistics left on the device; without ``backward``, only the statistics."""
        if backward and self.optimizer is None:
            raise RuntimeError("this engine was built with trainable=False")
        self._set_training(backward)
        with record_function("areal.pack"):
            mbs = self.micro_batches(batch)
            weights = [0.0 if mb.is_dummy else float(loss_weight_fn(mb.data)) for mb in mbs]
            total = dist.all_reduce_scalar(sum(weights))
        if backward:
            self.optimizer.zero_grad(set_to_none=True)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums: Dict[str, torch.Tensor] = {"loss": zero}  # (a rank with no micro-batch still reports one)
        for i, (mb, w) in enumerate(zip(mbs, weights)):
            if backward and self._hold_weights:
                # gradients summed over the micro-batches, reduce-scattered once, after the last;
                # with one unit only the root is an FSDP module (no walk over every module)
                last = i == len(mbs) - 1
                recurse = self.fsdp_units == "layer"
                self.model.set_requires_gradient_sync(last, recurse=recurse)
                self.model.set_reshard_after_backward(last, recurse=recurse)
            with record_function("areal.forward"):
                mb = mb.to(self.device)
                out = self._run(mb, temperature, with_entropy=True)
                loss, stats = loss_fn(out, mb.data)
            scale = w / total if total > 0 else 0.0
            if backward:
                with record_function("areal.backward"):
                    # FSDP averages gradients over ranks; the global token normalisation wants a sum.
                    (loss * (scale * self.info.world_size)).backward()
            for k, v in [("loss", loss), *stats.items()]:
                sums[k] = sums.get(k, zero) + torch.as_tensor(v).detach().to(self.device, torch.float64) * w
        # sums over all micro-batches of all ranks, still on the device: one all-reduce, no read
        keys = sorted(sums)
        t = torch.stack([sums[k] for k in keys]).to(dist.collective_device())  # float64, as summed
        plain = dict(n_tokens=total, n_mbs=float(len(mbs))) if backward else dict(n_tokens=total)
        return _Pending(keys, dist.all_reduce(t), divisor=total, plain=plain)

    def forward_backward(self, batch: Batch, loss_fn: LossFn, loss_weight_fn: WeightFn = loss_token_count,
                         temperature: float = 1.0) -> Dict[str, float]:
        """Zero the gradients, then accumulate those of the globally normalised loss."""
        return _read(self._forward_backward(batch, loss_fn, loss_weight_fn, temperature))

    def _optimizer_step(self) -> "_Pending":
        """Clip and step; fused AdamW skips a step by a device-side ``found_inf`` flag, so no wait for the GPU."""
        for m in self.model.modules():  # a no-grad forward since the backward left gathered weights in the modules
            if isinstance(m, FSDPModule):
                m.reshard()
        params = list(self.model.parameters())
        with record_function("areal.optimizer"):
            norm = grad_norm(params)
            if self.optimizer.defaults.get("fused"):
                skipped = (~torch.isfinite(norm)).to(torch.float32)
                clip_grads(params, self.config.optimizer.grad_clip, norm)
                self.optimizer.found_inf = skipped
                try:
                    self.optimizer.step()
                finally:
                    del self.optimizer.found_inf
            else:
                finite = bool(torch.isfinite(norm).item())
                if finite:
                    clip_grads(params, self.config.optimizer.grad_clip, norm)
                    self.optimizer.step()
                skipped = torch.tensor(0.0 if finite else 1.0)
            self.optimizer.zero_grad(set_to_none=True)
        values = torch.stack([norm.double().reshape(()), skipped.double().to(norm.device)])
        return _Pending(["grad_norm", "skipped_step"], values, plain=dict(lr=self.current_lr()))

    def optimizer_step(self) -> Dict[str, float]:
        """Clip gradients and step AdamW; a non-finite norm skips the step (``skipped_step=1``)."""
        return _read(self._optimizer_step())

    def train_batch(self, batch: Batch, loss_fn: LossFn, loss_weight_fn: WeightFn = loss_token_count,
                    temperature: float = 1.0) -> Dict[str, float]:
        """One optimizer step on this rank's share of a batch; global statistics, read from the device once. The LR
        scheduler steps apart (`step_lr_scheduler`): PPO makes several optimizer steps a step."""
        pending = self._forward_backward(batch, loss_fn, loss_weight_fn, temperature)
        return _read(pending, self._optimizer_step())

    @torch.no_grad()
    def eval_batch(self, batch: Batch, loss_fn: LossFn, loss_weight_fn: WeightFn = loss_token_count,
                   temperature: float = 1.0) -> Dict[str, float]:
        return _read(self._forward_backward(batch, loss_fn, loss_weight_fn, temperature, backward=False))

    def step_lr_scheduler(self) -> None:
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0

    def state_dict_for_hf(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Full CPU state dict with HF names on rank 0, ``{}`` elsewhere (collective), gathered into one reused host
        buffer (pinned on CUDA: asynchronous copies): the tensors are views of it, valid until the next call."""
        rank0 = self.info.rank == 0
        entries = self.hf_tensors(dtype)
        if rank0:
            need = sum(_aligned(v.numel() * d.itemsize) for _, v, d in entries)
            if self._staging is None or self._staging.numel() < need:
                self._staging = torch.empty(need, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        out: Dict[str, torch.Tensor] = {}
        offset = 0
        for name, value, to_dtype in entries:
            full = dist.full_tensor(value)
            if rank0:
                nbytes = full.numel() * to_dtype.itemsize
                view = self._staging[offset: offset + nbytes].view(to_dtype).view(full.shape)
                view.copy_(full.to(to_dtype), non_blocking=True)
                out[name] = view
                offset += _aligned(nbytes)
            del full
        if rank0 and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return checkpoint_layout(self.model, out) if rank0 else out

    def hf_tensors(self, dtype: Optional[torch.dtype] = None) -> List[Tuple[str, torch.Tensor, torch.dtype]]:
        """``(HF name, local shard, dtype it goes out in)`` of every weight, in one order on every rank; floating point
        ones in ``dtype`` (default: compute dtype); tied duplicates dropped (as ``save_pretrained``)."""
        dtype = dtype or self.precision.param_dtype
        tied = bool(getattr(self.hf_config, "tie_word_embeddings", False))
        entries, seen = [], set()
        for name, value in self.model.state_dict(keep_vars=True).items():
            if (tied and name == "lm_head.weight") or id(value) in seen:
                continue
            seen.add(id(value))
            entries.append((name, value.detach(), dtype if value.is_floating_point() else value.dtype))
        return entries


@dataclass
class _Pending:
    """Device-side statistics: ``values[i]`` is ``keys[i]`` (over ``divisor`` when set); ``plain``: host ones."""

    keys: List[str]
    values: torch.Tensor
    divisor: Optional[float] = None
    plain: Dict[str, float] = field(default_factory=dict)


def _read(*pending: _Pending) -> Dict[str, float]:
    """All pending statistics in one device-to-host copy (one wait for the GPU)."""
    device = pending[0].values.device
    values = iter(torch.cat([p.values.reshape(-1).to(device) for p in pending]).tolist())
    out: Dict[str, float] = {}
    for p in pending:
        for key in p.keys:
            v = float(next(values))
            if p.divisor is not None:
                v = v / p.divisor if p.divisor > 0 else 0.0
            out[key] = v
        out.update(p.plain)
    if out.get("skipped_step"):
        log.warning("non-finite gradient norm %s: optimizer step skipped", out["grad_norm"])
    return out


def checkpoint_layout(model: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``sd`` in the names and layout ``save_pretrained`` writes, which servers load: transformers 5 holds some weights
    otherwise (a MoE layer's experts fused into one tensor)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: the modules hold the checkpoint's layout
        return sd
    return {k: v.contiguous() for k, v in revert_weight_conversion(model, sd).items()}


def _aligned(nbytes: int, to: int = 64) -> int:
    return -(-nbytes // to) * to
