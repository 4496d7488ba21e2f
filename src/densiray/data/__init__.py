"""Data for densiray: registry and user-file datasets, the fixed split, and standardisation.

Light to import (numpy only; pandas and scikit-learn load lazily when needed).
"""

from densiray.data.datasets import Dataset, describe_datasets, list_datasets, load_dataset
from densiray.data.splits import Splits, Standardizer, split

__all__ = [
    "Dataset",
    "Splits",
    "Standardizer",
    "describe_datasets",
    "list_datasets",
    "load_dataset",
    "split",
]
