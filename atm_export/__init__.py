"""atm-export: deploy timm Vision Transformers accelerated by Adaptive Token Merging (ATM).

Where things live:
- merge math (split, match, weighted merge): ``atm_export.merge``
- merge-count policies (ATM thresholds, ToMe r): ``atm_export.schedule``
- patching timm VisionTransformers: ``atm_export.patch``
- FLOPs accounting: ``atm_export.flops``
- the TokenMerge op (PyTorch custom op, ONNX schema): ``atm_export.ops``
- exporters (ONNX, both flavours): ``atm_export.export``
- backends (ONNX Runtime, TensorRT): ``atm_export.backends``
- the command line: ``atm_export.cli``
"""

from .errors import NonFiniteInputError
from .merge import token_merge
from .patch import ATMVisionTransformer, patch_model
from .schedule import MergeConfig

__all__ = ["ATMVisionTransformer", "MergeConfig", "NonFiniteInputError", "patch_model", "token_merge"]
__version__ = "0.2.0"
