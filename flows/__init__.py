"""hetrain: train neural networks on CKKS-encrypted data from several owners, with every round a Prefect flow run.

    import hetrain
    result = hetrain.train(hetrain.load_config("configs/breast_cancer.yaml"), "runs/bc")

The names below load on first use, so `import hetrain` stays light (no Prefect, no TenSEAL).
"""

__all__ = ["load_config", "train", "RunConfig", "RunResult", "RoundResult", "HetrainError", "ConfigError"]

_API = {"load_config": "hetrain.api", "train": "hetrain.api", "RunResult": "hetrain.api",
        "RoundResult": "hetrain.api", "RunConfig": "hetrain.core.config",
        "HetrainError": "hetrain.core.errors", "ConfigError": "hetrain.core.errors"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'hetrain' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)
