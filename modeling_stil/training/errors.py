"""The error a run stops with before training when its pieces do not fit together."""


class JobError(ValueError):
    """The method, model, data and settings do not fit together; the message names the fix."""
