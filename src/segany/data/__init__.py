"""Segmentation datasets: readers (COCO JSON, YOLO-seg) and a synthetic generator."""

from __future__ import annotations

from .datasets import CocoDataset, ListDataset, Sample, SegDataset, YoloSegDataset, load_dataset
from .synthetic import SyntheticDataset, make_sample, write_synthetic

__all__ = ["CocoDataset", "ListDataset", "Sample", "SegDataset", "SyntheticDataset", "YoloSegDataset",
           "load_dataset", "make_sample", "write_synthetic"]
