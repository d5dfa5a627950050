"""Segment everything (automatic mask generation)."""

from __future__ import annotations

from typing import Any

from ..errors import NotAvailableError


def segment_everything(predictor, state, opts: dict[str, Any]):
    raise NotAvailableError(
        "segment-everything (a call with no prompts) is not available in this version yet; "
        "pass bboxes=..., points=... or masks=..."
    )
