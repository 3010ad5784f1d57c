"""Training: FSDP2 engine, packing, PPO/GRPO and SFT losses, weight publishing, checkpoints.

Knows nothing of servers or Slurm; imports only ``areal_hpc.config``, ``areal_hpc.registry``
(through arguments) and ``areal_hpc.toy`` from the project. Modules, one job each:

- ``dist``: process-group set-up from torchrun / Slurm environment variables
- ``batch``: padded batches <-> per-sample views, splitting and sharding
- ``packing``: micro-batches by token budget, packed rows with restarting position ids
- ``logprob``: per-token logprobs / entropies from logits, memory-bounded
- ``attention``: document-aware ("varlen") attention for packed rows
- ``parallel``: FSDP2 wrapping, mixed precision, activation checkpointing
- ``optim``: AdamW, LR schedule, gradient norm and clipping
- ``engine``: `FSDPEngine` (forward logprobs, train_batch)
- ``ppo_loss``: advantages, decoupled PPO loss, `PPOActor`
- ``sft``: NLL on response tokens, `SFTLearner`
- ``publish``: HF checkpoints of the current weights, pruning old versions
- ``weight_sync``: broadcasting weights to inference servers over NCCL
- ``checkpoint``: sharded DCP checkpoints with atomic "latest"
"""
