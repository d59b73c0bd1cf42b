"""Models: the model interface, ViT backbones, ACTR (one composition: as described, the Baseline and
ablations, and as released), the released-checkpoint converters, and a registry of builders.

- :mod:`~actr_core.models.base`: :class:`CorrespondenceModel` (``forward`` → :class:`MatchOutput`,
  ``loss``, ``transfer``) and the input checks every model runs.
- :mod:`~actr_core.models.backbones`: timm ViTs by name returning ``[cls]`` + patch tokens for any
  input whose sides are multiples of the patch size; weights from local files only.
- :mod:`~actr_core.models.conv_backbone`: one stage of a timm CNN as ``[cls]`` + grid tokens behind
  the same interface (stride 8: a finer grid that learns to match from random weights).
- :mod:`~actr_core.models.stages`: the contracts (``typing.Protocol``) of the stages ACTR takes.
- :mod:`~actr_core.models.actr`, :mod:`~actr_core.models.builders`, :mod:`~actr_core.models.config`:
  the ACTR composition; ACTR as described (the default), the Baseline and the Table 4 ablations
  (``actr_base()``, ``actr_base(ablation="no_flow_sr")``, ``baseline()``, ...).
- :mod:`~actr_core.models.released`: ACTR as released, the same composition with the released
  blocks (:func:`actr_released`).
- :mod:`~actr_core.models.convert`: released checkpoints ↔ ours (:func:`load_official_actr`).
- :mod:`~actr_core.models.registry`: ``register_model`` / ``model_entries`` / ``build_model``.

See docs/models.md.
"""

from actr_core.models.actr import ACTR
from actr_core.models.backbones import (
    ViTBackbone,
    WeightsReport,
    convert_vit_state_dict,
    create_vit,
    load_vit_weights,
    read_checkpoint,
    resample_pos_embed_bicubic,
    vit_base16,
    vit_small16,
)
from actr_core.models.base import CorrespondenceModel, MatchOutput, check_image, check_image_pair, parameter_count
from actr_core.models.builders import (
    actr_base,
    actr_base_512,
    actr_conv_tiny,
    actr_small,
    actr_small_512,
    actr_tiny,
    baseline,
    baseline_512,
    build_actr,
)
from actr_core.models.config import ABLATIONS, ACTRConfig, ACTRReleasedConfig
from actr_core.models.conv_backbone import ConvBackbone, ConvBackboneConfig, create_conv_backbone, load_conv_weights
from actr_core.models.convert import (
    OfficialCheckpointError,
    load_official_actr,
    official_key_to_ours,
    official_parameter_count,
    official_state_dict_shapes,
    our_key_to_official,
    to_official_state_dict,
)
from actr_core.models.mmnet import MMNet, MMNetConfig, MMNetOutput, mmnet_resnet50, mmnet_resnet101, mmnet_tiny
from actr_core.models.registry import ModelEntry, build_model, get_model_entry, model_entries, register_model
from actr_core.models.released import actr_released
from actr_core.models.stages import (
    Backbone,
    CorrelationReadout,
    CorrespondenceStage,
    FlowLoss,
    FlowUpsampler,
    SoftArgmaxReadout,
    SourcePositionalEncoding,
)

__all__ = [
    # interface
    "CorrespondenceModel",
    "MatchOutput",
    "check_image",
    "check_image_pair",
    "parameter_count",
    # backbones
    "ViTBackbone",
    "WeightsReport",
    "create_vit",
    "vit_small16",
    "vit_base16",
    "load_vit_weights",
    "convert_vit_state_dict",
    "read_checkpoint",
    "resample_pos_embed_bicubic",
    "ConvBackbone",
    "ConvBackboneConfig",
    "create_conv_backbone",
    "load_conv_weights",
    # stage contracts
    "Backbone",
    "SourcePositionalEncoding",
    "CorrespondenceStage",
    "CorrelationReadout",
    "SoftArgmaxReadout",
    "FlowUpsampler",
    "FlowLoss",
    # ACTR as released and the released-checkpoint converters
    "ACTRReleasedConfig",
    "actr_released",
    "load_official_actr",
    "official_key_to_ours",
    "our_key_to_official",
    "official_state_dict_shapes",
    "official_parameter_count",
    "to_official_state_dict",
    "OfficialCheckpointError",
    # ACTR as described, the Baseline, the Table 4 ablations
    "ACTR",
    "ACTRConfig",
    "ABLATIONS",
    "build_actr",
    "actr_base",
    "actr_small",
    "actr_base_512",
    "actr_small_512",
    "actr_tiny",
    "actr_conv_tiny",
    "baseline",
    "baseline_512",
    # MMNet (ICCV 2021)
    "MMNet",
    "MMNetConfig",
    "MMNetOutput",
    "mmnet_resnet101",
    "mmnet_resnet50",
    "mmnet_tiny",
    # registry
    "ModelEntry",
    "register_model",
    "model_entries",
    "get_model_entry",
    "build_model",
]
