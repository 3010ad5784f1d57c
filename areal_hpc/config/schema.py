"""The configuration tree of one run.

Every knob a user can set lives here, as plain dataclasses with defaults. Sources are merged in
`config.loader` (defaults < YAML < ``key=value`` overrides); this module only declares.
Field names the AReaLite seed used are kept verbatim (``experiment_name``, ``allocation_mode``,
``trainer.ppo.async_training``, ``trainer.sft.model.path``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

MODES = ("local", "slurm", "ray", "torchrun")
SUPPORTED_MODES = ("local", "slurm", "ray", "torchrun")
TRAINER_TYPES = ("ppo", "sft", "null")
LOCK_KINDS = ("flock", "soft", "lease")


@dataclass
class ClusterConfig:
    """Where the run lives and what the machines look like."""

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
    setup_commands: List[str] = field(default_factory=list)  # shell lines run before the driver (modules, conda, container env)
    python: str = ""  # interpreter on compute nodes; default: the one running `areal-hpc submit`
    multi_node_tp: bool = False  # allow a server's tp*pp to span nodes
    hf_cache: str = ""  # Hugging Face cache on the shared filesystem (HF_HOME layout: hub/, datasets/); "" = {fileroot}/{user}/hf-cache
    # run dir (config, logs, checkpoints, weights) readable by your group: dirs 0750 / files 0640
    # instead of 0700 / 0600 (the registry and its secret stay private either way)
    group_readable: bool = False
    ray_address: str = "auto"  # mode=ray: the Ray cluster's GCS host:port, or auto (RAY_ADDRESS, else the one started on this host)


@dataclass
class LauncherConfig:
    """How processes find each other and how long they wait."""

    lock_kind: str = "flock"  # flock (local disks, Lustre/GPFS with flock) | soft | lease (NFS)
    heartbeat_s: float = 2.0
    ttl_s: float = 15.0  # a record not refreshed for this long is dead
    server_startup_timeout_s: float = 900.0
    trainer_wait_servers_timeout_s: float = 1800.0
    requeue_on_preemption: bool = True
    wait: bool = False  # mode=slurm: `submit` waits for the job to end (exit code = the driver's) instead of returning once it runs


@dataclass
class ServerConfig:
    """Inference servers (SGLang or the embedded `hf` engine)."""

    model_path: str = ""  # default: the actor model (trainer.ppo.actor.path)
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    context_length: int = 4096
    max_running_requests: int = 256
    mem_fraction_static: float = 0.8
    random_seed: int = 1
    port: int = 0  # 0 = pick a free port
    host: str = ""  # "" = this node's hostname
    sglang_args: Dict[str, str] = field(default_factory=dict)  # pass-through SGLang flags, e.g. {"attention-backend": "fa3"}
    cuda_graph: bool = True  # hf engine: capture CUDA graphs for decode on GPU


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class RolloutConfig:
    """The staleness-bounded rollout controller and its workflow."""

    batch_size: int = 32  # prompts (groups) per training step
    n_samples: int = 8  # completions per prompt (GRPO group size)
    max_head_offpolicyness: int = 2  # 0 = synchronous
    max_concurrent_rollouts: int = 0  # 0 = batch_size * (max_head_offpolicyness + 1)
    workflow: str = "rlvr"
    reward_fn: str = "exact_match"
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    request_timeout_s: float = 3600.0
    # no silent stalls: the trainer fails the run when, while it waits for a batch, most finished
    # groups were dropped as stale or failed for drop_timeout_s, or no batch came for stall_timeout_s
    # with servers live (it logs why meanwhile, at least every minute)
    drop_timeout_s: float = 300.0
    stall_timeout_s: float = 3600.0


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
    """How a batch is split: by a token budget per micro-batch (first-fit-decreasing)."""

    max_tokens_per_mb: int = 16384
    n_mbs: int = 1  # minimum number of micro-batches


@dataclass
class EngineConfig:
    """A trainable model under FSDP2."""

    path: str = ""  # HF model dir (or a `toy:` spec, see areal_hpc.toy)
    dtype: str = "auto"  # auto = bf16 params/fp32 reduce on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    attn_impl: str = "sdpa"
    # logprobs straight from the last hidden states and the LM head's weight, chunk by chunk, never
    # holding a micro-batch's full logits (models whose head is not a plain bias-free linear layer,
    # or that scale/soft-cap logits, always go through the logits)
    fused_lm_head: bool = True
    # with fused_lm_head, keep each chunk's logits from forward for backward rather than recompute
    # them: one [T, H] x [H, V] matmul less per micro-batch for T x V bf16 values of GPU memory
    # (5 GB at 16k tokens per micro-batch and a 152k vocabulary)
    lm_head_keep_logits: bool = False
    # torch.compile each decoder layer (fused norms/activations, fewer kernel launches; with
    # attn_impl=varlen the flash kernel is part of the compiled layer). Costs compile time at
    # start-up; GPU only (ignored on CPU)
    compile_layers: bool = False
    # fill every packed micro-batch up to mb_spec.max_tokens_per_mb with a padding document that
    # no loss sees: compiled layers then see one shape and get static-shape kernels. The padding
    # costs compute, so it pays when micro-batches are nearly full (many samples per step)
    pad_micro_batches: bool = False
    # with compile_layers: projections of the same input (query/key/value, gate/up) run as one
    # matmul on concatenated weights (narrow key/value projections are slow on their own)
    fuse_linears: bool = True
    # FSDP units: layer (each decoder layer, then the root), model (one unit, gathered once per
    # step and kept with its gradients unsharded until the step's last micro-batch: fewer hooks and
    # collectives for a model whose full weights and fp32 gradients fit on each GPU), auto (model on
    # one rank, and on ranks of one host when 6 bytes per parameter fit in an eighth of a device's
    # memory; layer otherwise, see train/parallel.resolve_fsdp_units)
    fsdp_units: str = "auto"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class PPOConfig:
    """Decoupled PPO / GRPO (AReaL's loss)."""

    actor: EngineConfig = field(default_factory=EngineConfig)
    mb_spec: MicroBatchSpec = field(default_factory=MicroBatchSpec)
    async_training: bool = True  # False forces max_head_offpolicyness = 0
    ppo_n_minibatches: int = 1
    eps_clip: float = 0.2
    c_clip: Optional[float] = 3.0  # dual clip; null disables
    behav_imp_weight_cap: Optional[float] = 5.0  # cap on pi_prox / pi_behav; null disables
    use_decoupled_loss: bool = True
    recompute_logprob: bool = True
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
    total_train_epochs: int = 0  # >0 caps by epochs too
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    # the run's owner restarts a dead trainer up to this many times, from its last checkpoint, servers
    # untouched; a trainer that dies twice in a row before its first step is not restarted (crash loop)
    max_restarts: int = 3
    plugins: List[str] = field(default_factory=list)  # modules or .py files registering trainers/workflows/rewards


@dataclass
class DatasetConfig:
    """Prompts (and answers) for training or evaluation, and how they become token ids."""

    path: str = ""  # local .jsonl/.json/.parquet file, a local dataset dir, a hub name (openai/gsm8k), or a `toy:` spec
    name: Optional[str] = None  # the dataset's config name (datasets.load_dataset(path, name)), e.g. "main"
    split: str = ""  # "" = train for train_dataset, test (or validation) for valid_dataset
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    messages_key: str = "messages"  # a row may give chat messages (list of {role, content}) instead of a prompt
    adapter: str = ""  # built-in row mapping, e.g. "gsm8k" (question -> user message, `#### N` -> answer)
    chat_template: str = "auto"  # auto (the tokenizer's chat template when it has one) | none (raw text)
    system_prompt: str = ""  # with a chat template: a system message before every prompt
    shuffle: bool = True
    max_prompt_len: int = 1024
    limit: int = 0  # 0 = all rows


@dataclass
class SaverConfig:
    freq_steps: int = 50  # DCP checkpoint every K steps (0 = only on signal / end)
    keep_last: int = 2


@dataclass
class RecoverConfig:
    mode: str = "auto"  # auto (resume if a checkpoint exists) | disabled | resume (must exist)


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
