"""Training: FSDP2 engine, packing, PPO/GRPO and SFT losses, weight publishing and broadcast, checkpoints. Knows
nothing of servers or Slurm."""
