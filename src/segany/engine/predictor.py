"""The Predictor: encode an image once, answer many prompts (SPEC §4).

State is explicit: :attr:`Predictor.image` holds the current image and its embedding, set only
after an encode succeeded, so a failed call leaves the predictor as it was. Per-call options
never persist into the next call.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import DEFAULTS, EVERYTHING_DEFAULTS, check_options
from ..errors import ConfigError, PromptError, WeightsChangedError, warn
from ..hub import resolve_weights, same_checkpoint
from ..models.registry import ModelConfig
from .decoding import decode_in_chunks
from .deferred import DeferredLogits, refused
from .device import autocast, select_device
from .image_state import Features, ImageState, feature_slice, load_image_state, save_image_state
from .prompts import Prompts, parse_prompts
from .report import RunReport, reported
from .results import Results
from .saving import RunWriter
from .sources import count_sources, expand_once, iter_sources, load_image
from .transforms import binary_masks_to_logits, image_to_tensor, masks_from_logits, scale_coords


# More images than this in one call without stream=True: a warning that every result stays in memory.
MANY_RESULTS = 100


class Predictor:
    """``Predictor(overrides=dict(model="mobile_sam.pt", imgsz=1024, conf=0.25))``; without a model,
    :meth:`setup_model` loads one (the option values are checked against it then).

    ``set_image`` encodes; calling with prompts decodes on the cached embedding; calling with a
    ``source`` encodes that source first; calling with no prompts runs segment-everything.
    The current image (:attr:`image`) is state: one predictor per thread, or a lock
    (``Predictor(model=..., config=...)`` shares another's weights).
    """

    def __init__(self, overrides: dict[str, Any] | None = None, model: nn.Module | None = None,
                 config: ModelConfig | None = None) -> None:
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides must be a dict of options, e.g. dict(model='sam_b.pt'), got {overrides!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model= takes a built nn.Module, got {type(model).__name__}; "
                              "name a checkpoint with overrides=dict(model='sam_b.pt')")
        self.overrides = check_options(dict(overrides or {}))
        self.args: dict[str, Any] = {**DEFAULTS, **self.overrides}
        self.device = select_device(self.args["device"])
        self.model: nn.Module | None = None
        self.model_config: ModelConfig | None = None
        self._image: ImageState | None = None
        # Results of prompts on the current image whose whole low-res logits are made when first
        # read (see _run); made at the latest when the image changes, so no result keeps an
        # embedding alive, or sees other weights (SAM.train resets the image first).
        self._deferred: weakref.WeakSet[Results] = weakref.WeakSet()
        self._compiled: tuple[nn.Module, Any] | None = None  # (model, its compiled encode_image)
        if model is not None:
            self._use_model(model, config)
        elif self.args["model"] is not None:
            self.setup_model(self.args["model"], config)
        if set(self.overrides) & set(EVERYTHING_DEFAULTS):
            from .everything import check_everything_options

            check_everything_options(self.args)

    @property
    def image(self) -> ImageState | None:
        """The current image and its embedding: what prompts given without a source segment."""
        return self._image

    @image.setter
    def image(self, state: ImageState | None) -> None:
        if state is not self._image:
            for r in list(self._deferred):
                try:
                    r.low_res_logits  # noqa: B018 - reading makes them, from the image they belong to
                except WeightsChangedError as e:  # said when they are read; the embedding is let go
                    r.low_res_logits = refused(e)
            self._deferred.clear()
        self._image = state

    # -- model -------------------------------------------------------------------------------
    def setup_model(self, model: str | Path, config: ModelConfig | None = None) -> None:
        """Resolve (download if needed) and load a checkpoint by name or path; ``config``, when
        given, replaces recognition (what a custom SAM 2's tensors cannot tell: heads, size)."""
        from ..checkpoints import load_model

        path = resolve_weights(model)
        net, config = load_model(path, name=Path(str(model)).stem, config=config)
        self._use_model(net, config)
        self.args["model"] = str(path)

    def _use_model(self, model: nn.Module, config: ModelConfig | None) -> None:
        before = self.model, self.model_config
        self.model, self.model_config = model.to(self.device).eval(), config
        try:
            self._options({})  # bad values for this model fail here, not at every later call
        except ConfigError:
            self.model, self.model_config = before
            raise
        self.image = None

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise ConfigError("no model loaded: pass overrides=dict(model='sam_b.pt') or call setup_model(...)")
        return self.model

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        model = self._require_model()
        # A model's own defaults (registry ``extra["defaults"]``) replace the global ones, never
        # what the caller set.
        own = self.model_config.extra.get("defaults", {}) if self.model_config else {}
        own = {k: v for k, v in own.items() if k not in self.overrides}
        given = check_options(kwargs)
        if given.get("model") is not None and not same_checkpoint(given["model"], self.args["model"]):
            raise ConfigError(f"model={given['model']!r}: this predictor holds {self.args['model']!r}; "
                              f"load the other one with SAM({given['model']!r})")
        explicit = {**self.overrides, **given}
        if explicit.get("point_grids") is not None and explicit.get("points_stride") is not None:
            raise ConfigError("point_grids and points_stride (points_per_side) both given: give only one "
                              "(the grids replace the regular grid)")
        opts = {**self.args, **own, **given}
        if opts["imgsz"] is not None and opts["imgsz"] != model.img_size:
            raise ConfigError(f"imgsz={opts['imgsz']}: this model works at imgsz={model.img_size}")
        if str(opts["device"]) != str(self.args["device"]):
            dev = select_device(opts["device"])
            if dev != self.device:
                raise ConfigError(f"device={opts['device']!r}: this predictor runs on {self.device}; "
                                  f"create it with device={opts['device']!r}")
        return opts

    # -- images ------------------------------------------------------------------------------
    def encode(self, images: list[np.ndarray], half: bool = False, compile: bool = False
               ) -> list[tuple[torch.Tensor, tuple[int, int], float]]:
        """BGR images → per image: embedding ``(1, C, h, w)``, input size, preprocess ms (one encoder
        pass; through ``torch.compile`` with ``compile=True``)."""
        model = self._require_model()
        batch, sizes, prep_ms = [], [], []
        for img in images:
            t0 = time.perf_counter()
            size = model.input_size(*img.shape[:2])
            x = image_to_tensor(img, size, self.device, model.resize_mode)
            sizes.append(size)
            batch.append(model.preprocess(x))
            prep_ms.append((time.perf_counter() - t0) * 1000)
        encode_image = self._compiled_encoder() if compile else model.encode_image
        with torch.inference_mode(), autocast(self.device, half):
            feats = encode_image(torch.cat(batch))
        return [(feature_slice(feats, i), sizes[i], prep_ms[i]) for i in range(len(images))]

    def _compiled_encoder(self):
        """``torch.compile`` of the model's ``encode_image``, made once per model. Its first call
        compiles (tens of seconds; again for each new input shape); it pays off in long jobs."""
        if self._compiled is None or self._compiled[0] is not self.model:
            self._compiled = (self.model, torch.compile(self.model.encode_image))
        return self._compiled[1]

    def _encode_states(self, named: list[tuple[str, np.ndarray]], opts: dict[str, Any]) -> list[ImageState]:
        t0 = time.perf_counter()
        encoded = self.encode([img for _, img in named], half=bool(opts["half"]), compile=bool(opts["compile"]))
        per_image = (time.perf_counter() - t0) * 1000 / len(named) - sum(e[2] for e in encoded) / len(named)
        return [
            ImageState(img, name, img.shape[:2], size, feats, encode_ms=per_image, preprocess_ms=prep,
                       decoder_input=self.decoder_input(feats))
            for (name, img), (feats, size, prep) in zip(named, encoded)
        ]

    def decoder_input(self, features: Features) -> Any:
        """Features prepared for the decoder once per image: for SAM the embedding with the
        decoder's prompt-independent projections (``Sam.prepare_image``, a few ms), which every
        later prompt reuses; other models take their features as they are."""
        prepare = getattr(self._require_model(), "prepare_image", None)
        if prepare is None:
            return features
        with torch.inference_mode():
            return prepare(features)

    def set_image(self, image: Any) -> None:
        """Encode one image (path, URL, BGR ndarray, PIL image or tensor) and keep its embedding."""
        name = str(image) if isinstance(image, (str, Path)) else "image0"
        img = load_image(image)
        self.image = self._encode_states([(name, img)], self.args)[0]

    def get_image_embedding(self) -> torch.Tensor:
        """The current image embedding ``(1, C, h, w)``; for SAM 2 a dict of the feature levels.
        A copy outside inference mode, that autograd and in-place operations take."""
        feats = self._require_image().features
        with torch.inference_mode(False):
            return {k: v.clone() for k, v in feats.items()} if isinstance(feats, dict) else feats.clone()

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.image = None

    def save_embedding(self, path: str | Path) -> None:
        """Save the current image and embedding so another process can prompt without encoding."""
        save_image_state(self._require_image(), self._require_model(), path)

    def load_embedding(self, path: str | Path, name: str | None = None) -> None:
        """Load an embedding written by :meth:`save_embedding` (tensors only: ``weights_only=True``).
        Results are named ``name``, else after the image the embedding was made from."""
        state = load_image_state(path, self._require_model()).with_features_on(self.device)
        self.image = dataclasses.replace(state, path=name or state.path,
                                         decoder_input=self.decoder_input(state.features))

    def _require_image(self) -> ImageState:
        if self.image is None:
            raise PromptError("no image is set: call set_image(...) first, or pass source=... (reset_image() clears it)")
        return self.image

    # -- prompts -----------------------------------------------------------------------------
    def __call__(self, source: Any = None, stream: bool = False, bboxes=None, points=None, labels=None,
                 masks=None, multimask_output: bool | None = None, **kwargs: Any):
        """Segment ``source`` (or the current image) with prompts, or everything when none are given.

        Returns a list of :class:`Results` (one per image), or a generator when ``stream=True``.
        """
        if multimask_output is not None:
            kwargs["multimask_output"] = multimask_output
        opts = self._options(kwargs)
        multimask = opts["multimask_output"]
        prompts = dict(bboxes=bboxes, points=points, labels=labels, masks=masks)
        has_prompt = any(v is not None for v in prompts.values())
        # Bad segment-everything values fail before any image is encoded, also when prompts make them unused.
        from .everything import check_everything_options

        check_everything_options(opts)
        if source is None and self.image is None:
            source = opts["source"]  # the overrides' default source (as Ultralytics' args.source)
        writer = RunWriter.from_options(opts)
        if opts["show"]:
            warn("show=True opens no window in segany: use results[i].plot() (a BGR array) or save=True")
        stream = stream or opts["stream"]
        report = None
        if opts["verbose"] or not stream:
            if source is not None:
                source = expand_once(source)  # counted, then iterated: directories listed once
            total = 1 if source is None else count_sources(source, vid_stride=int(opts["vid_stride"]))
            if not stream and total is not None and total > MANY_RESULTS:
                warn(f"the results of {total} images are kept in memory, each with its image and masks: "
                     "pass stream=True to get them one at a time")
            if opts["verbose"]:
                report = RunReport(total, self._require_model())
        if source is None:
            state = self._require_image()
            gen = iter([self._run(state, prompts, has_prompt, multimask, opts, interactive=True)])
        else:
            on_skip = None if report is None else report.skip
            gen = self._run_sources(source, prompts, has_prompt, multimask, opts, on_skip)
        if writer is not None:
            gen = writer.passing(gen, bool(opts["verbose"]))
        if source is not None:
            gen = self._keeping_image(gen)
        if report is not None:
            gen = reported(gen, report)
        return gen if stream else list(gen)

    def _run_sources(self, source, prompts, has_prompt, multimask, opts,
                     on_skip: Callable[[str], None] | None = None) -> Iterator[Results]:
        batch = opts["batch"] or (8 if self.device.type == "cuda" else 1)
        pending: list[tuple[str, np.ndarray]] = []
        for item in iter_sources(source, vid_stride=int(opts["vid_stride"]), on_skip=on_skip):
            pending.append(item)
            if len(pending) == batch:
                yield from self._run_batch(pending, prompts, has_prompt, multimask, opts)
                pending = []
        if pending:
            yield from self._run_batch(pending, prompts, has_prompt, multimask, opts)

    def _keeping_image(self, results: Iterator[Results]) -> Iterator[Results]:
        """``results``; if making or writing one fails, the current image is put back as it was
        before the call, whatever the batch size."""
        before = self.image
        try:
            yield from results
        except Exception:
            self.image = before
            raise

    def _run_batch(self, named, prompts, has_prompt, multimask, opts) -> Iterator[Results]:
        if has_prompt:  # check prompts against every image of the batch before the expensive encode
            with warnings.catch_warnings():  # warnings come once, from the real call below
                warnings.simplefilter("ignore")
                for name, img in named:
                    try:
                        self._parse(img.shape[:2], prompts)
                    except PromptError as e:  # which image, in a folder or a list of them
                        raise PromptError(f"{name}: {e}") from None
        for state in self._encode_states(named, opts):
            self.image = state  # the last image stays available for prompt-only calls
            yield self._run(state, prompts, has_prompt, multimask, opts)

    def _run(self, state: ImageState, prompts, has_prompt, multimask, opts, interactive: bool = False) -> Results:
        """One image's results. ``interactive``: a prompt on the predictor's current image."""
        if not has_prompt:
            from .everything import segment_everything

            return segment_everything(self, state, opts)
        parsed = self._parse(state.original_size, prompts)
        half = bool(opts["half"])
        t0 = time.perf_counter()
        model = self._require_model()
        # Prompting a set image on a CPU, a SAM decoder upscales only the part of the logits the
        # masks read, not the padding of a non-square image (a quarter of a 4:3 image's
        # upscaling, ~7 % of a box prompt); the whole low-res logits are made when first read, or
        # when the predictor's image changes (the image setter). (Results of images passed as
        # sources get them at once: the image changes with the next one anyway.)
        extent = model.low_res_extent(state.input_size) if interactive and self.device.type == "cpu" and hasattr(
            model, "low_res_extent") else None
        low_res, iou = self.decode(state, parsed, multimask, half=half, extent=extent)
        t1 = time.perf_counter()
        n, k = iou.shape
        order = torch.argsort(iou, dim=1, descending=True) if k > 1 else torch.zeros_like(iou, dtype=torch.long)
        pick = (torch.arange(n, device=order.device)[:, None] * k + order).flatten()
        # Best first per prompt: the logits are put in order, not the original-size masks made from
        # them (a copy of 16 masks of a 12-megapixel photo took ~130 ms).
        low_res = low_res.flatten(0, 1)[pick]
        masks = self.logits_to_masks(state, low_res[:, None])[:, 0]
        limit = getattr(model, "low_res_logits_limit", None)
        low_res_logits: Any = low_res if limit is None else low_res.clamp_(-limit, limit)
        if low_res.shape[-2:] != model.prompt_encoder.mask_input_size:  # the same prompts, the whole logits
            def whole() -> torch.Tensor:
                logits = self.decode(state, parsed, multimask, half=half, model=model)[0].flatten(0, 1)[pick]
                return logits if limit is None else logits.clamp_(-limit, limit)

            low_res_logits = DeferredLogits(whole, model)
        t2 = time.perf_counter()
        results = Results(
            orig_img=state.orig_img,
            path=state.path,
            masks=masks,
            scores=iou.flatten()[pick].float(),
            cls=torch.arange(n).repeat_interleave(k),
            low_res_logits=low_res_logits,
            # A prompt on the set image took only its decode: the encode was an earlier call's.
            speed=dict(preprocess=0.0 if interactive else state.preprocess_ms,
                       inference=(0.0 if interactive else state.encode_ms) + (t1 - t0) * 1000,
                       postprocess=(t2 - t1) * 1000),
        )
        if callable(low_res_logits):
            self._deferred.add(results)
        return results

    def _parse(self, image_size: tuple[int, int], prompts: dict[str, Any]) -> Prompts:
        low_res = self._require_model().prompt_encoder.mask_input_size[0]
        return parse_prompts(image_size, low_res_size=low_res, **prompts)

    def decode(self, state: ImageState, prompts: Prompts, multimask: bool, half: bool = False,
               extent: tuple[int, int] | None = None, model: nn.Module | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (original pixels) → low-res logits ``(N, K, 256, 256)`` and IoU ``(N, K)``
        (with ``extent``, SAM's top-left part that covers it: see ``Sam.decode``). ``model``: the
        one that made ``state`` (default the predictor's)."""
        model = model or self._require_model()
        dev = self.device
        pts = lab = boxes = mask_in = None
        if prompts.points is not None:
            pts = torch.as_tensor(scale_coords(prompts.points, state.original_size, state.input_size),
                                  dtype=torch.float32, device=dev)
            lab = torch.as_tensor(prompts.labels, dtype=torch.int64, device=dev)
        if prompts.boxes is not None:
            xy = scale_coords(prompts.boxes.reshape(-1, 2, 2), state.original_size, state.input_size).reshape(-1, 4)
            boxes = torch.as_tensor(xy, dtype=torch.float32, device=dev)
        if prompts.masks is not None and prompts.masks_are_logits:
            mask_in = torch.as_tensor(prompts.masks, dtype=torch.float32, device=dev)[:, None]
        elif prompts.masks is not None:  # binary masks at the image size
            mask_in = binary_masks_to_logits(prompts.masks, state.input_size, model.img_size,
                                             model.prompt_encoder.mask_input_size).to(dev)
        with torch.inference_mode(), autocast(dev, half):
            low, iou = decode_in_chunks(model, state.for_decoder(), None if pts is None else (pts, lab), boxes, mask_in,
                                        multimask_output=multimask, extent=extent)
        return low.float(), iou.float()

    def logits_to_masks(self, state: ImageState, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits ``(N, K, 256, 256)`` (or SAM's ``low_res_extent`` of them) → bool masks
        ``(N, K, H, W)`` at the original size."""
        model = self._require_model()
        if low_res.device.type == "cpu":
            return masks_from_logits(low_res, model, state.input_size, state.original_size)
        out = []
        for s in range(0, len(low_res), 16):  # bounds the float upsampled copy for large images
            up = model.postprocess_masks(low_res[s : s + 16], state.input_size, state.original_size)
            out.append(up > model.mask_threshold)
        return torch.cat(out) if out else torch.zeros((0, low_res.shape[1], *state.original_size), dtype=torch.bool)

