"""Configuration: the dataclass tree, its loading, the allocation grammar (imports nothing of ours)."""

from areal_hpc.config.allocation import AllocationMode, ParallelSpec, parse_allocation, validate_allocation
from areal_hpc.config.errors import ConfigError
from areal_hpc.config.loader import dump_yaml, from_dict, load_config, load_resolved
from areal_hpc.config.schema import *  # noqa: F401,F403  (the dataclasses are the public surface)
from areal_hpc.config.validate import (actor_path, check_location, datasets_in_use, looks_like_hub_name, models_in_use,
                                      prompt_tokenizer_path, raw_text_refusal, run_dir, run_umask, validate)
