"""The trainer: configuration sections, the one loop and its syncs, static jobs, run records."""

from ..._lazy import lazy_names

# imported on first use (lowcomm/_lazy.py): `lowcomm launch` loads the launcher alone
__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        ".build": ("Replicas", "build_inner_optimizer", "build_model", "evaluate", "lr_lambda"),
        ".config": (
            "FLAT",
            "MODES",
            "DataConfig",
            "ElasticConfig",
            "LinkConfig",
            "ModelConfig",
            "OptimConfig",
            "RunConfig",
            "TrainConfig",
            "load_config_file",
        ),
        ".launch": ("launch",),
        ".loop": ("Trainer", "train"),
        ".records": (
            "SUMMARY_KEYS",
            "NullRecorder",
            "RunRecorder",
            "atomic_write_json",
            "read_jsonl",
            "timeline",
            "write_summary",
        ),
        ".sync": ("DataParallel", "DiLoCoSync", "Sync"),
        ".topology": ("Topology", "init_from_torchrun", "is_distributed_env"),
    },
)
