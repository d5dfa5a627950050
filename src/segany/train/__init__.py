"""Training and validation of SAM models (``segany train`` / ``segany val``)."""

from __future__ import annotations

from .trainer import TRAINABLE, set_trainable, train
from .validate import OracleRunner, SamRunner, format_table, val

__all__ = ["TRAINABLE", "OracleRunner", "SamRunner", "format_table", "set_trainable", "train", "val"]
