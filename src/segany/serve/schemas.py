"""Request and response bodies of the API (they also make the OpenAPI docs)."""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .limits import ApiError

Points = Union[list[float], list[list[float]], list[list[list[float]]]]
Labels = Union[int, list[int], list[list[int]]]
Boxes = Union[list[float], list[list[float]]]
MAX_EVERYTHING_POINTS = 64 * 64  # point prompts per segment-everything request, crops included
_ENGINE_BOXES = re.compile(r"\bbboxes\b")
_ENGINE_MASKS = re.compile(r"\bmasks(?=: \d)")


def api_wording(message: str) -> str:
    """An engine message (error or warning) in the API's names: the engine's argument ``bboxes``
    is the request field ``boxes``, and ``masks`` counted (``masks: 2``) is ``mask_input`` (see
    :meth:`PromptRequest.prompts`)."""
    return _ENGINE_MASKS.sub("mask_input", _ENGINE_BOXES.sub("boxes", message))


class ErrorBody(BaseModel):
    """Every error answer (4xx/5xx)."""

    detail: str = Field(description="what is wrong and how to fix it")
    field: Optional[str] = Field(None, description="the request part at fault (a body field, file, image_id, body)")
    errors: Optional[list[dict[str, Any]]] = Field(None, description="a 422's validation errors, when there are several")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route's error statuses, all with :class:`ErrorBody`."""
    what = {400: "malformed request", 404: "unknown image id (upload it again)", 413: "over a size cap",
            415: "not an image / not JSON", 422: "invalid prompt or options", 503: "queue full: retry"}
    return {code: {"model": ErrorBody, "description": what[code]} for code in statuses}


class ImageInfo(BaseModel):
    id: str = Field(description="content hash of the upload; use it in the other calls")
    width: int
    height: int


class PromptRequest(BaseModel):
    """Prompts in pixels of the original image, shaped as for ``SAM(...)``."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "yes" is not a bool, "3" not a number
    points: Optional[Points] = Field(None, description="[x, y], [[x, y], ...] (one object each) "
                                                       "or [[[x, y], ...], ...]")
    labels: Optional[Labels] = Field(None, description="1 positive / 0 negative, shaped like points")
    boxes: Optional[Boxes] = Field(None, description="[x1, y1, x2, y2] or a list of them")
    mask_input: Optional[Union[str, list[str]]] = Field(None,
                                                        description="logits_id(s) of earlier masks of this image")
    multimask_output: bool = Field(False, description="3 candidates per prompt, best first")
    png: bool = Field(False, description="add each mask as a base64 PNG")
    polygons: bool = Field(False, description="add each mask's polygon (pixels)")

    def prompts(self, max_prompts: int) -> dict[str, Any]:
        """The prompts as keyword arguments of ``Predictor``; too many objects is a 422."""
        if self.points is None and self.boxes is None and self.mask_input is None:
            raise ApiError(422, "give at least one prompt: points, boxes or mask_input "
                                "(segment-everything is POST /api/images/{id}/everything)", "points")
        if isinstance(self.mask_input, list) and not 1 <= len(self.mask_input) <= max_prompts:
            raise ApiError(422, f"mask_input: give 1 to {max_prompts} logits ids, got {len(self.mask_input)}",
                           "mask_input")
        for field in ("points", "boxes"):
            v = getattr(self, field)
            n = len(v) if isinstance(v, list) and v and isinstance(v[0], list) else 1
            if v is not None and n > max_prompts:
                raise ApiError(422, f"{field}: {n} objects, over the cap of {max_prompts} per request", field)
            if isinstance(v, list) and v and isinstance(v[0], list) and v[0] and isinstance(v[0][0], list):
                if any(len(obj) > max_prompts for obj in v):
                    raise ApiError(422, f"{field}: over {max_prompts} points for one object", field)
        return dict(points=self.points, labels=self.labels, bboxes=self.boxes)


class EverythingRequest(BaseModel):
    """Segment-everything parameters (Meta's names), bounded so one request stays bounded."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "yes" is not a bool, "3" not a number
    points_per_side: int = Field(32, ge=1, le=64)
    points_per_batch: int = Field(64, ge=8, le=256)
    # The score filters default to the model's own (Meta's 0.88 / 0.95 for SAM; a model's registry
    # entry may have others): a field left out is not sent.
    pred_iou_thresh: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                          description="default: the model's (0.88 for SAM)")
    stability_score_thresh: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                                 description="default: the model's (0.95 for SAM)")
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0, allow_inf_nan=False)
    crop_n_layers: int = Field(0, ge=0, le=2)
    min_mask_region_area: int = Field(0, ge=0, le=1_000_000)
    use_m2m: bool = Field(False, description="refine each mask once with itself as the mask prompt (sam2)")
    png: bool = False
    polygons: bool = Field(False, description="add each mask's polygon (pixels)")

    def options(self) -> dict[str, Any]:
        """The options for ``Predictor``; a request whose point grid is over the cap is a 422."""
        crops = sum(4**i for i in range(self.crop_n_layers + 1))
        if self.points_per_side**2 * crops > MAX_EVERYTHING_POINTS:
            raise ApiError(422, f"points_per_side={self.points_per_side} with crop_n_layers={self.crop_n_layers} is "
                                f"{self.points_per_side**2 * crops} prompts, over the cap of {MAX_EVERYTHING_POINTS}",
                           "points_per_side")
        return {k: v for k, v in self.model_dump(exclude={"png", "polygons"}).items() if v is not None}
