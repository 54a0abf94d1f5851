"""The training side of stil: arguments, the Accelerate loop (trainer.py), job assembly (job.py),
export (export.py), checkpoints, metrics, plots, model cards and Hub upload.

``fit(recipe, **overrides)`` trains from Python through the same path as ``train.py``."""


def fit(*args, **kwargs):
    from .job import fit as _fit

    return _fit(*args, **kwargs)


fit.__doc__ = "Train from Python through the same path as train.py; see modeling_stil.training.job.fit."

__all__ = ["fit"]
