"""Data layer: schema, dataset IO, builders, semi-supervised splits, a run's dataset preparation and labelled
split, fingerprints, views and loaders."""

from .io import DatasetError, DatasetMetadata, load_dataset, save_dataset
from .schema import SchemaError, TabularField, TabularSchema
from .splits import SplitError, check_labeled_split, select_labeled

__all__ = [
    "DatasetError", "DatasetMetadata", "load_dataset", "save_dataset", "SchemaError", "TabularField", "TabularSchema",
    "SplitError", "check_labeled_split", "select_labeled",
]
