"""atm-export: deploy timm Vision Transformers accelerated by Adaptive Token Merging (ATM).

The Python API (docs/api.md)::

    atm = atm_export.patch(timm_model)                  # its registry preset, lossless
    atm = atm_export.patch(timm_model, alpha=0.985)     # the preset with one setting changed
    cfg = atm_export.MergeConfig.from_preset("deit_s", "fast")

Where things live:
- merge math (split, match, weighted merge): ``atm_export.merge``
- merge-count policies (ATM thresholds, ToMe r): ``atm_export.schedule``
- presets and overrides -> the settings of a run: ``atm_export.settings``
- patching timm VisionTransformers: the ``atm_export.patch`` module (``from atm_export.patch
  import ...``; the package attribute ``atm_export.patch`` is the :func:`patch` function)
- FLOPs accounting: ``atm_export.flops``
- the TokenMerge op contract (attributes, versions, node names): ``atm_export.contract``;
  as a PyTorch custom op and ONNX schema: ``atm_export.ops``
- exporters (both ONNX flavours, the lowering, the export bundle, integrity): ``atm_export.export``
- backends (eager, ONNX Runtime, TensorRT) behind one runner interface: ``atm_export.backends``
- parity decisions: ``atm_export.parity``; benchmark timing and statistics: ``atm_export.bench``
- the jobs (the main export job, ``check``): ``atm_export.jobs``; the command line: ``atm_export.cli``
- the typed report and its views: ``atm_export.report``
"""

from .errors import NonFiniteInputError, SettingsError
from .merge import token_merge
from .patch import ATMVisionTransformer, patch_model
from .schedule import MergeConfig
from .settings import Settings, patch, resolve_settings  # after .patch: the name patch is the function

__all__ = ["ATMVisionTransformer", "MergeConfig", "NonFiniteInputError", "Settings", "SettingsError", "patch",
           "patch_model", "resolve_settings", "token_merge"]
__version__ = "0.2.0"
