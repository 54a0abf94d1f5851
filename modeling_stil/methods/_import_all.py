"""Importing this module registers every built-in method (add one line per new method file)."""

import importlib

BUILTIN_METHOD_MODULES = [
    "supervised",
    "fixmatch",
    "stil",
    "tip_pretrain",
    "simmatch",
    "comatch",
    "freematch",
    "mmatch",
    "co_training",
    "mean_teacher",
    "l2i",
    "mixmatch",
    "pseudo_label",
]

for _module in BUILTIN_METHOD_MODULES:
    importlib.import_module(f"{__package__}.{_module}")
