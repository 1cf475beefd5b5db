"""NeMo-Run configurations of megatron_ext.training: recipes, executors, experiments, reports.

Kept outside the library (megatron_ext never imports run_configs). Names are imported lazily so
that `python -m run_configs --help` stays quick.

    from run_configs import tiny_pretrain, paper_pretrain, local_executor, slurm_executor, launch
"""

from __future__ import annotations

from megatron_ext._lazy import lazy_exports

_EXPORTS = {
    "GLOBAL_BATCH_TOKENS": "recipes",
    "PAPER_LAYOUTS": "recipes",
    "PAPER_MODELS": "recipes",
    "PRESETS": "recipes",
    "PaperLayout": "recipes",
    "get_recipe": "recipes",
    "model_config": "recipes",
    "paper_midtrain": "recipes",
    "paper_pretrain": "recipes",
    "pretrain_task": "recipes",
    "shaping_config": "recipes",
    "tiny_midtrain": "recipes",
    "tiny_pretrain": "recipes",
    "ParallelLayout": "executors",
    "check_world": "executors",
    "local_executor": "executors",
    "slurm_executor": "executors",
    "use_nemorun_home": "executors",
    "compare_presets": "experiments",
    "dryrun": "experiments",
    "launch": "experiments",
    "preset_tasks": "experiments",
    "write_report": "report",
    "RLProbeConfig": "rl_probe",
    "run_rl_probe": "rl_probe",
}

__all__ = [
    "GLOBAL_BATCH_TOKENS",
    "PAPER_LAYOUTS",
    "PAPER_MODELS",
    "PRESETS",
    "PaperLayout",
    "ParallelLayout",
    "RLProbeConfig",
    "check_world",
    "compare_presets",
    "dryrun",
    "get_recipe",
    "launch",
    "local_executor",
    "model_config",
    "paper_midtrain",
    "paper_pretrain",
    "preset_tasks",
    "pretrain_task",
    "run_rl_probe",
    "shaping_config",
    "slurm_executor",
    "tiny_midtrain",
    "tiny_pretrain",
    "use_nemorun_home",
    "write_report",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
