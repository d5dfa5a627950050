"""Pure ``nn.Module`` implementations of the Segment Anything models (no file, network or image I/O)."""

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .registry import BUILDERS, MODELS, ModelConfig, WeightsFile, build_model, find_config
from .sam import Sam
from .transformer import TwoWayTransformer
from .vit import ImageEncoderViT

__all__ = [
    "BUILDERS",
    "MODELS",
    "ImageEncoderViT",
    "MaskDecoder",
    "ModelConfig",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "WeightsFile",
    "build_model",
    "find_config",
]
