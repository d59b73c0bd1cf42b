"""Building blocks of ACTR (CVPR 2023): pure, shape-typed functions, each with a thin ``nn.Module``.

- :mod:`~actr_core.blocks.attention`: the attention probabilities (one ``softmax(q kᵀ · scale)``
  for every attention whose probabilities are read) and biased (asymmetric) cross-attention, Sec. 3.2.
- :mod:`~actr_core.blocks.reweighting`: salient target reweighting, Eq. 1, and the target block.
- :mod:`~actr_core.blocks.correlation`: multi-head correlation, Eq. 2.
- :mod:`~actr_core.blocks.soft_argmax`: correlation → coarse flow, Eq. 3.
- :mod:`~actr_core.blocks.windows`: (shifted-)window attention with relative position bias.
- :mod:`~actr_core.blocks.flow_sr`: dual-window matching-flow super-resolution, Sec. 3.4.
- :mod:`~actr_core.blocks.loss`: masked flow loss, Eq. 4.
- :mod:`~actr_core.blocks.released`: the blocks ACTR as released composes instead (docs/models.md).
- :mod:`~actr_core.blocks.device_table`: execution choices per device type (chunking, fused
  attention, mixed precision) in one table; :func:`precision_context` for inference at bf16/fp16.
- MMNet (ICCV 2021): :mod:`~actr_core.blocks.multiscale`, :mod:`~actr_core.blocks.coarse_to_fine`,
  :mod:`~actr_core.blocks.correlation_keypoints` (see ``docs/mmnet.md``).

See ``docs/blocks.md`` for shapes, equations and the choices made where the paper is silent.
"""

from actr_core.blocks.attention import (
    BiasedCrossAttention,
    attention_probs,
    biased_cross_attention,
    cross_attention_probs,
)

# MMNet (ICCV 2021): multi-scale blocks, coarse-to-fine correlation, keypoint loss and transfer (docs/mmnet.md)
from actr_core.blocks.coarse_to_fine import (
    coarse_to_fine_correlation,
    correlation_pyramid,
    dot_product_correlation,
    reverse_correlation,
    upsample_correlation,
)
from actr_core.blocks.correlation import (
    CorrelationFromAttention,
    MultiHeadCorrelation,
    correlation_from_attention,
    multihead_correlation,
)
from actr_core.blocks.correlation_keypoints import (
    CorrelationKeypointLoss,
    argmax_flow,
    argmax_transfer,
    correlation_keypoint_loss,
    gaussian_kernel2d,
    keypoint_target_map,
    sample_correlation,
    soft_argmax_transfer,
    softmax_bce,
)
from actr_core.blocks.correlation_loss import CorrelationCrossEntropy, correlation_cross_entropy
from actr_core.blocks.device_table import (
    DEVICE_CHOICES,
    PRECISIONS,
    DeviceChoices,
    autocast_dtype,
    cpu_bf16_refusal,
    device_choices,
    precision_context,
)
from actr_core.blocks.flow_sr import DualWindowFlowSR, DualWindowRound, FlowSRConfig, flow_sr_input, refine_paths
from actr_core.blocks.loss import MaskedFlowLoss, masked_flow_loss
from actr_core.blocks.multiscale import (
    LocalSelfAttention,
    MultiScaleDilatedBlock,
    MultiScaleStage,
    TopDownFusion,
    local_self_attention,
    multiscale_dilated_conv,
    multiscale_stage,
    top_down_fusion,
)
from actr_core.blocks.reweighting import (
    ReweightedTargetBlock,
    TargetReweighting,
    target_reweighting,
    target_token_weights,
)
from actr_core.blocks.soft_argmax import SoftArgmax, soft_argmax
from actr_core.blocks.windows import (
    WindowAttention,
    WindowTransformerBlock,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
    window_self_attention,
)

__all__ = [
    # Sec. 3.2: attention probabilities, biased cross-attention
    "attention_probs",
    "biased_cross_attention",
    "cross_attention_probs",
    "BiasedCrossAttention",
    # Eq. 1: salient target reweighting
    "target_reweighting",
    "target_token_weights",
    "TargetReweighting",
    "ReweightedTargetBlock",
    # Eq. 2: multi-head correlation
    "multihead_correlation",
    "correlation_from_attention",
    "CorrelationFromAttention",
    "MultiHeadCorrelation",
    # Eq. 3: soft-argmax
    "soft_argmax",
    "SoftArgmax",
    # Sec. 3.4: matching-flow super-resolution
    "DualWindowFlowSR",
    "DualWindowRound",
    "FlowSRConfig",
    "flow_sr_input",
    "refine_paths",
    "window_self_attention",
    "WindowAttention",
    "WindowTransformerBlock",
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_mask",
    # Eq. 4: masked flow loss
    "masked_flow_loss",
    "MaskedFlowLoss",
    # not in the paper: cross-entropy of a correlation against the ground-truth match
    "correlation_cross_entropy",
    "CorrelationCrossEntropy",
    # MMNet (ICCV 2021)
    "multiscale_dilated_conv",
    "MultiScaleDilatedBlock",
    "multiscale_stage",
    "MultiScaleStage",
    "local_self_attention",
    "LocalSelfAttention",
    "top_down_fusion",
    "TopDownFusion",
    "dot_product_correlation",
    "upsample_correlation",
    "coarse_to_fine_correlation",
    "correlation_pyramid",
    "reverse_correlation",
    "sample_correlation",
    "gaussian_kernel2d",
    "keypoint_target_map",
    "softmax_bce",
    "correlation_keypoint_loss",
    "CorrelationKeypointLoss",
    "argmax_transfer",
    "soft_argmax_transfer",
    "argmax_flow",
    # execution choices per device type (no effect on float32 values); mixed precision by name
    "DEVICE_CHOICES",
    "DeviceChoices",
    "device_choices",
    "PRECISIONS",
    "autocast_dtype",
    "cpu_bf16_refusal",
    "precision_context",
]
