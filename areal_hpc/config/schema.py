"""The configuration tree of one run, as dataclasses with defaults. The AReaLite seed's field names are kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ClusterConfig:
    fileroot: str = "./runs"  # must be shared by all nodes on a cluster; run dir = fileroot/user/exp/trial
    n_nodes: int = 1
    n_gpus_per_node: int = 8  # 0 = CPU-only nodes (every "GPU" in the allocation is one process)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"  # Slurm time limit (HH:MM:SS or D-HH:MM:SS)
    constraint: Optional[str] = None
    cpus_per_gpu: int = 8
    mem_per_gpu_gb: int = 64
    cpus_per_task_cpu: int = 1  # cpus per process when n_gpus_per_node == 0
    mem_per_task_cpu_gb: int = 2  # memory per process when n_gpus_per_node == 0
    sbatch_args: List[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. ["--exclusive"]
    srun_args: List[str] = field(default_factory=list)  # extra options on every srun step
    setup_commands: List[str] = field(default_factory=list)  # shell lines run before the driver (modules, conda, env)
    python: str = ""  # interpreter on compute nodes; default: the one running `areal-hpc submit`
    multi_node_tp: bool = False  # allow a server's tp*pp to span nodes
    hf_cache: str = ""  # HF_HOME on the shared filesystem; "" = {fileroot}/{user}/hf-cache
    group_readable: bool = False  # run dir 0750/0640 instead of 0700/0600 (the registry stays private)
    ray_address: str = "auto"  # mode=ray: the GCS host:port, or auto (RAY_ADDRESS, else the one on this host)


@dataclass
class LauncherConfig:
    lock_kind: str = "flock"  # flock (local disks, Lustre/GPFS with flock) | soft | lease (NFS)
    heartbeat_s: float = 2.0
    ttl_s: float = 15.0  # a record not refreshed for this long is dead
    server_startup_timeout_s: float = 900.0
    trainer_wait_servers_timeout_s: float = 1800.0
    requeue_on_preemption: bool = True
    wait: bool = False  # mode=slurm: `submit` waits for the job to end and exits with the driver's code


@dataclass
class ServerConfig:
    model_path: str = ""  # default: the actor model (trainer.ppo.actor.path)
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    context_length: int = 4096
    max_running_requests: int = 256
    mem_fraction_static: float = 0.8
    random_seed: int = 1
    port: int = 0  # 0 = pick a free port
    host: str = ""  # "" = this node's hostname
    sglang_args: Dict[str, str] = field(default_factory=dict)  # SGLang flags as given: {"attention-backend": "fa3"}
    cuda_graph: bool = True  # hf engine: capture CUDA graphs for decode on GPU


# SGLang's scheduler refuses an input within 6 tokens of the context length (max_req_input_len = context_len - 1 - 5,
# managers/tp_worker.py): the server refuses such a prompt, and a run whose samples could resume with one is refused
SGLANG_INPUT_MARGIN = 6
GREEDY_BELOW = 1e-6  # SGLang's rule: a lower temperature samples greedily and scores the tokens at temperature 1


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def logprob_temperature(self) -> float:
        """The temperature the servers score tokens at, which the trainer's logprobs must use too."""
        return self.temperature if self.temperature >= GREEDY_BELOW else 1.0


@dataclass
class RolloutConfig:
    batch_size: int = 32  # prompts (groups) per training step
    n_samples: int = 8  # completions per prompt (GRPO group size)
    max_head_offpolicyness: int = 2  # 0 = synchronous
    max_concurrent_rollouts: int = 0  # 0 = batch_size * (max_head_offpolicyness + 1)
    workflow: str = "rlvr"
    workflow_args: Dict[str, Any] = field(default_factory=dict)  # the workflow's own settings: {max_turns: 2}
    reward_fn: str = "exact_match"
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    request_timeout_s: float = 3600.0
    reward_timeout_s: float = 60.0  # to score one group; a reward that takes longer (or raises) scores 0
    drop_timeout_s: float = 300.0  # fail when most finished groups were wasted (stale, failed) for this long
    stall_timeout_s: float = 3600.0  # fail when no batch came for this long with servers live
    # trainer rank 0's rollout client in a forked process, off the trainer's GIL (disk weight updates only)
    client_process: bool = True


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class MicroBatchSpec:
    max_tokens_per_mb: int = 16384
    n_mbs: int = 1  # minimum number of micro-batches


@dataclass
class EngineConfig:
    path: str = ""  # HF model dir (or a `toy:` spec, see areal_hpc.toy)
    dtype: str = "auto"  # auto = bf16 params/fp32 reduce on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    attn_impl: str = "sdpa"
    fused_lm_head: bool = True  # logprobs chunk by chunk from the last hidden states, never a micro-batch's logits
    lm_head_keep_logits: bool = False  # keep chunk logits for backward: a matmul less, T x V memory more
    compile_layers: bool = False  # torch.compile each decoder layer (GPU only; costs start-up time)
    pad_micro_batches: bool = False  # pad micro-batches to max_tokens_per_mb: one shape for compiled layers
    share_stems: bool = True  # run documents that differ only in their last token once (exact)
    fuse_linears: bool = True  # with compile_layers: q/k/v and gate/up as one matmul each
    # layer | model (one unit, unsharded through a step: fewer collectives when it fits) | auto (train/parallel.py)
    fsdp_units: str = "auto"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class PPOConfig:
    actor: EngineConfig = field(default_factory=EngineConfig)
    mb_spec: MicroBatchSpec = field(default_factory=MicroBatchSpec)
    async_training: bool = True  # False forces max_head_offpolicyness = 0
    ppo_n_minibatches: int = 1
    eps_clip: float = 0.2
    c_clip: Optional[float] = 3.0  # dual clip; null disables
    behav_imp_weight_cap: Optional[float] = 5.0  # cap on pi_prox / pi_behav; null disables
    use_decoupled_loss: bool = True  # implies recompute_logprob (as AReaL's): it weighs by pi_prox / pi_behav
    recompute_logprob: bool = True  # the proximal policy's logprobs; false (not decoupled): PPO on the behaviour's
    adv_norm: str = "group"  # group | batch | none
    adv_std_norm: bool = True
    leave_one_out: bool = False
    kl_ctl: float = 0.0  # >0 keeps a frozen reference model
    entropy_coef: float = 0.0
    weight_update: str = "disk"  # disk | nccl (GPUs) | gloo (the same broadcast through host memory: CPU runs)


@dataclass
class SFTConfig:
    model: EngineConfig = field(default_factory=EngineConfig)
    mb_spec: MicroBatchSpec = field(default_factory=MicroBatchSpec)
    batch_size: int = 32


@dataclass
class TrainerConfig:
    type: Optional[str] = "ppo"  # ppo | sft | null (rollout / evaluation only) | a registered plugin
    total_train_steps: int = 100
    total_train_epochs: int = 0  # >0 also stops after this many passes over the training rows (prompts)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    max_restarts: int = 3  # of a dead trainer, from its last checkpoint (not when it dies twice before a step)
    plugins: List[str] = field(default_factory=list)  # modules or .py files registering trainers/workflows/rewards


@dataclass
class DatasetConfig:
    path: str = ""  # .jsonl/.json/.parquet file, dataset dir, hub name (openai/gsm8k) or `toy:` spec
    name: Optional[str] = None  # the dataset's config name, e.g. "main"
    split: str = ""  # "" = train for train_dataset, test (or validation) for valid_dataset
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    messages_key: str = "messages"  # a row may give chat messages (list of {role, content}) instead of a prompt
    adapter: str = ""  # a row mapping (rollout.adapters), e.g. "gsm8k"
    chat_template: str = "auto"  # auto (the tokenizer's chat template when it has one) | none (raw text)
    system_prompt: str = ""  # with a chat template: a system message before every prompt
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)  # to the template: {enable_thinking: false}
    shuffle: bool = True
    max_prompt_len: int = 1024  # prompt tokens: longer prompts are left out (PPO, SFT, eval); SFT never cuts answers
    limit: int = 0  # 0 = all rows


@dataclass
class SaverConfig:
    freq_steps: int = 50  # DCP checkpoint every K steps (0 = only on signal / end)
    keep_last: int = 2


@dataclass
class RecoverConfig:
    # auto (resume if a checkpoint exists) | resume (must exist) | disabled (start over: submit moves the trial's
    # earlier checkpoints/, weights/ and metrics.jsonl into previous-<time>/; a restarted trainer resumes from the new
    # run's own)
    mode: str = "auto"


@dataclass
class StatsConfig:
    tensorboard: bool = True
    plot: bool = True
    progress_bar: bool = True


@dataclass
class ExperimentConfig:
    """One run: `{cluster.fileroot}/{user}/{experiment_name}/{trial_name}`."""

    experiment_name: str = "areal"
    trial_name: str = "trial0"
    mode: str = "local"  # local | slurm | ray (an existing Ray cluster) | torchrun (trainer under torchrun's agent)
    allocation_mode: str = "hf.d1p1m1+d1p1m1"
    shutdown_server_on_exit: bool = True
    min_required_servers: int = 0  # >0: reuse live servers of this run, start only a trainer
    seed: int = 1
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    valid_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    saver: SaverConfig = field(default_factory=SaverConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
