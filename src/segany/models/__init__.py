"""Pure ``nn.Module`` implementations of the Segment Anything models (no file, network or image I/O)."""

from .hiera import Hiera
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .registry import BUILDERS, MODELS, ModelConfig, WeightsFile, build_model, find_config
from .sam import Sam
from .sam2 import Sam2
from .sam2_decoder import Sam2MaskDecoder, Sam2PromptEncoder
from .sam2_neck import FpnNeck, Sam2ImageEncoder
from .transformer import TwoWayTransformer
from .vit import ImageEncoderViT

__all__ = [
    "BUILDERS",
    "MODELS",
    "FpnNeck",
    "Hiera",
    "ImageEncoderViT",
    "MaskDecoder",
    "ModelConfig",
    "PromptEncoder",
    "Sam",
    "Sam2",
    "Sam2ImageEncoder",
    "Sam2MaskDecoder",
    "Sam2PromptEncoder",
    "TwoWayTransformer",
    "WeightsFile",
    "build_model",
    "find_config",
]
