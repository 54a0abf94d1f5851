"""Semi-supervised methods: one small file per algorithm, registered by name."""

from .base import METHODS, MethodArguments, SSLMethod, TrainState, get_method_class, register_method

__all__ = ["METHODS", "MethodArguments", "SSLMethod", "TrainState", "get_method_class", "register_method"]
