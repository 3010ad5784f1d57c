"""Training: FSDP2 engine, packing, PPO/GRPO and SFT losses, weight publishing, checkpoints.

Knows nothing of servers or Slurm: ``dist`` (process groups), ``batching`` (rank shards, micro-batches by token budget),
``logprob``, ``packed_attention`` (varlen), ``parallel`` (FSDP2, compile), ``engine`` (`FSDPEngine`, AdamW),
``ppo_loss`` / ``sft_loss``, ``publish`` (HF checkpoints of the weights), ``weight_sync`` (broadcast to servers),
``checkpoint`` (DCP), ``phases``."""
