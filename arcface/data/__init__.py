"""Datasets and loaders; every dataset yields (uint8 (3,112,112) RGB, int label)."""
from arcface.data.folder import ImageFolderDataset
from arcface.data.record import RecordDataset
from arcface.data.synthetic import SyntheticIdentities, synthetic_pair_set

__all__ = ["ImageFolderDataset", "RecordDataset", "SyntheticIdentities", "synthetic_pair_set"]
