"""Configurations of ACTR: as described in the paper (CVPR 2023, Sec. 3-4), its Baseline and
ablations (:class:`ACTRConfig`), and as released (:class:`ACTRReleasedConfig`).

Every number the composition in :mod:`actr_core.models.actr` uses is a field here, commented with
its source: the paper (section, equation or table), the released code (github YXSUNMADMAX/ACTR,
facts only), or "our choice" where the paper is silent or inconsistent (docs/models.md, section
"ACTR as described", gives the reasons). The builders in :mod:`actr_core.models.builders` and
:mod:`actr_core.models.released` fill them.
"""

import dataclasses
from typing import Any

from actr_core.blocks import FlowSRConfig
from actr_core.flow import FLOW_STRIDE
from actr_core.models.conv_backbone import ConvBackboneConfig

__all__ = ["ACTRConfig", "ACTRReleasedConfig", "ACTR_RELEASED_CONFIG", "ABLATIONS", "VARIANTS"]

#: Table 4 ablations, selectable by name in the builders (``actr_base(ablation="no_flow_sr")``).
ABLATIONS: tuple[str, ...] = (
    "no_source_pe",  # Table 4 "w/o source branch positional encoding"
    "no_target_reweighting",  # Table 4 "w/o target branch token reweighting"
    "no_asymmetric_cross_attention",  # Table 4 "w/o asymmetric cross attention module" (Sec. 4.2)
    "no_multi_path",  # Table 4 "w/o multi-path super-resolution"
    "single_window",  # Table 4 "w/o dual window flow refinement"
    "no_flow_sr",  # Table 4 "w/o flow super-resolution module"
)

#: every composition a config can describe: the full model, the Baseline, the ablations
VARIANTS: tuple[str, ...] = ("actr", "baseline", *ABLATIONS)


@dataclasses.dataclass(frozen=True)
class ACTRConfig:
    """Hyper-parameters of ACTR as described (the defaults are ACTR with ViT-B/16 at 256 × 256)."""

    # --- which composition ---------------------------------------------------------------------
    variant: str = "actr"  # one of VARIANTS; recorded so a checkpoint says what it is (our choice)

    # --- backbone (paper Sec. 3.1, Sec. 4) -------------------------------------------------------
    backbone: str = "vit_base_patch16_224"  # paper Sec. 4: ViT-B/16 (iBOT); Table 3: ViT-S/16 for ACTR-S
    backbone_depth: int | None = None  # None: the timm model's own depth (12); smaller only for tests
    patch_size: int = 16  # paper Sec. 3.1: "16×16 patches"; inputs must be multiples of it
    image_size: tuple[int, int] = (256, 256)  # paper Sec. 4: 256×256 (ACTR) or 512×512 (ACTR_h);
    #   the training frame: the grid the backbone position embedding and the source PE are learnt
    #   for; other multiples of patch_size resample both (bicubic, backbones.resample_pos_embed_bicubic)
    freeze_backbone: bool = False  # paper Sec. 4 trains the backbone (lr 6e-6); released code freezes it
    # (with a CNN backbone only its CNN is frozen: the projection, [cls] and position embedding are new)
    conv_backbone: ConvBackboneConfig | None = None  # None: the ViT named by `backbone` (paper Sec. 3.1).
    #   Not in the paper: a stage of the timm CNN named by `backbone` as the token grid (its stride is
    #   `patch_size`), for training from random weights on small data (docs/training.md)

    # --- asymmetric feature learning (paper Sec. 3.2) --------------------------------------------
    num_blocks: int = 6  # paper Sec. 3.2 / Sec. 4: M = 6 asymmetric blocks
    decoder_heads: int = 8  # paper Eq. 2: "H (=8)"; released code num_heads=8. Sec. 4 says the blocks
    #   share the backbone's hyper-parameters (12 heads for ViT-B): we follow Eq. 2 (docs/models.md)
    mlp_ratio: float = 4.0  # paper Sec. 4: blocks take the backbone's hyper-parameters (ViT mlp ratio 4)
    qkv_bias: bool = True  # as the ViT/iBOT backbone (paper Sec. 4) and the released code
    norm_eps: float = 1e-6  # LayerNorm eps of the ViT/iBOT backbone (timm ViT) and of the released code
    attn_scale: float | None = None  # None: d^-1/2 with d = dim / decoder_heads. Eq. 2 writes 1/√c;
    #   we read c as the per-head width, as in [43] and the released code (docs/models.md)
    share_branch_weights: bool = True  # our choice (released code does the same): the source block
    #   and the target block of Eq. 1 share self-attention, FFN and LayerNorms (Siamese); False
    #   gives each branch its own weights
    init_std: float = 0.02  # trunc-normal std of the blocks' Linear weights (biases 0, LayerNorm
    #   1/0): the ViT/timm init, which the released code also uses; the paper is silent
    source_pe_init_std: float = 0.0  # learnable source PE initialised to zeros, as in the released
    #   code (the paper is silent); > 0: truncated normal with this std

    # --- matching flow (paper Sec. 3.3) ----------------------------------------------------------
    soft_argmax_beta: float = 0.02  # released code: softmax temperature on head-SUMMED attention.
    #   Eq. 2 averages the heads instead, so the same sharpness is tau = beta / decoder_heads on
    #   our head-mean correlation (see soft_argmax_tau); the paper gives no value

    # --- matching flow super-resolution (paper Sec. 3.4, Sec. 4) --------------------------------
    flow_sr: FlowSRConfig = FlowSRConfig()  # dim 96, 8 heads, windows 4 and 8, shift 2, ×4, head
    #   32 → 2: paper Sec. 3.4 / Sec. 4 (field comments in actr_core.blocks.flow_sr.FlowSRConfig)
    upscale: int = 4  # paper Sec. 3.4: the final flow is at 4h × 4w (also for models without SR)
    single_window_size: int = 8  # Table 4 "w/o dual window": the window kept. The paper does not say
    #   which; our choice: the larger (8×8, more context per token; shift 2 stays valid)

    # --- training objective (paper Eq. 4) -------------------------------------------------------
    loss_squared: bool = False  # Eq. 4 writes ‖·‖²; the released code (and the paper's "matching
    #   flow" EPE tradition, CATs [8]) minimises the plain end-point error: we follow the code
    correlation_loss_weight: float = 0.0  # 0: Eq. 4 alone (the paper). Not in the paper: > 0 adds this
    #   weight × the cross-entropy of every path's correlation (Eq. 2) against the ground-truth match
    #   (actr_core.blocks.CorrelationCrossEntropy), for training from random weights (docs/training.md)

    # --- execution (no effect on values) ---------------------------------------------------------
    grad_checkpointing: bool = False  # our choice, not in the paper: True recomputes each
    #   correspondence block's activations (and the backbone's, when it supports it) in the backward
    #   pass instead of storing them: less memory in training, the same values and gradients

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant = {self.variant!r}: expected one of {VARIANTS}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks = {self.num_blocks}: expected at least 1")
        if self.decoder_heads < 1 or self.patch_size < 1 or self.upscale < 1:
            raise ValueError(
                f"decoder_heads = {self.decoder_heads}, patch_size = {self.patch_size}, "
                f"upscale = {self.upscale}: expected positive integers"
            )
        h, w = self.image_size
        if h <= 0 or w <= 0 or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image_size = {self.image_size}: sides must be positive multiples of patch_size = {self.patch_size}"
            )
        if self.patch_size % self.upscale:
            raise ValueError(
                f"patch_size = {self.patch_size} is not divisible by upscale = {self.upscale}: the flow "
                "grid must be a whole fraction of the input frame"
            )
        if self.patch_size // self.upscale != FLOW_STRIDE:
            raise ValueError(
                f"patch_size = {self.patch_size} / upscale = {self.upscale} gives a flow grid at 1/"
                f"{self.patch_size // self.upscale} of the frame: every matcher's flow (and the data's) is at 1/{FLOW_STRIDE} "
                f"(a stride-{self.patch_size} backbone needs upscale = {max(1, self.patch_size // FLOW_STRIDE)})"
            )
        if self.conv_backbone is not None and self.backbone_depth is not None:
            raise ValueError(
                f"backbone_depth = {self.backbone_depth} cuts a ViT's blocks; with conv_backbone (a CNN stage of "
                f"{self.backbone!r}) set backbone_depth=None"
            )
        if not self.correlation_loss_weight >= 0:
            raise ValueError(f"correlation_loss_weight = {self.correlation_loss_weight}: expected >= 0")
        if not self.soft_argmax_beta > 0:
            raise ValueError(f"soft_argmax_beta = {self.soft_argmax_beta}: expected > 0")
        if self.flow_sr.upscale != self.upscale:
            raise ValueError(f"flow_sr.upscale = {self.flow_sr.upscale} but upscale = {self.upscale}: they must agree")

    @property
    def token_grid(self) -> tuple[int, int]:
        """Token grid of the training frame: ``image_size / patch_size`` (16 × 16 at 256)."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def soft_argmax_tau(self) -> float:
        """Temperature of Eq. 3 on the head-MEAN correlation of Eq. 2.

        ``softmax(Σ_h A_h / β) = softmax(mean_h A_h / (β / H))``: the released code's β on the
        head sum equals ``β / H`` on the head mean (0.02 / 8 = 0.0025 for ACTR).
        """
        return self.soft_argmax_beta / self.decoder_heads


@dataclasses.dataclass(frozen=True)
class ACTRReleasedConfig:
    """Numbers of ACTR as released. Sources: ``models/ACTR.py`` (class and line names given),
    ``models/base/swin.py``, ``train_DP.py`` defaults."""

    backbone: str = "vit_base_patch16_224"  # FeatureExtractionHyperPixel_VIT: vit_base(patch_size=16), iBOT weights
    backbone_kwargs: tuple[tuple[str, Any], ...] = ()  # extra timm kwargs (tests use tiny ViTs); none as released
    image_size: int = 256  # ACTR.forward: 16×16 tokens (feature_size_model) × patch 16; pos_embed of 256 + 1
    depth: int = 6  # train_DP.py --depth 6: 5 MultiscaleBlock + 1 last_block
    num_heads: int = 8  # train_DP.py --num_heads 8 (head_dim 96 for ViT-B)
    mlp_ratio: float = 4.0  # train_DP.py --mlp_ratio 4
    norm_eps: float = 1e-6  # TransformerAggregator: partial(nn.LayerNorm, eps=1e-6)
    flow_upsample: int = 4  # ACTR.forward: Size = 64 from the 16×16 grid, flow × Size/16
    guidance_dim: int = 94  # refine_proj_query_feat: Conv2d(768, 94, 1); 94 + 2 flow channels = 96
    guidance_dropout: float = 0.5  # ACTR.dropout2d = nn.Dropout2d(p=0.5)
    sr_heads: int = 8  # SwinTransformer2d(num_heads=[8])
    sr_windows: tuple[int, ...] = (8, 4)  # refine_swin_decoder_2_* (window 8) and _1_* (window 4)
    sr_rounds: int = 2  # refine_swin_decoder_*_1 then *_2
    sr_mlp_ratio: float = 4.0  # SwinTransformer2d default mlp_ratio=4.
    sr_hidden: int = 32  # refine2: Conv2d(96, 32, 3) → ReLU → Conv2d(32, 2, 3)
    channel_reduction: int = 16  # ChannelAttention: in_planes // 16 (hard-coded)
    beta: float = 0.02  # ACTR.soft_argmax(beta=0.02), temperature of the softmax over target cells
    freeze_backbone: bool = True  # train_DP.py --freeze True: backbone requires_grad=False
    refine_chunk: int | None = None  # execution only (no effect on values): paths refined per call, 0 =
    #   all in one call, None = by device (actr_core.blocks.device_table: 1 on CPU, all on CUDA). The
    #   released ACTR.forward refines one path at a time; 1 keeps that working set (peak memory) and
    #   is no slower on CPU (docs/benchmarks.md)

    @property
    def sr_dim(self) -> int:
        """Channels of the refiner: 2 flow channels + the guidance (96 as released)."""
        return self.guidance_dim + 2

    @property
    def variant(self) -> str:
        """``"released"``: the composition this config describes (``ACTRConfig.variant`` names the others)."""
        return "released"


#: ACTR as released, the released sizes (ViT-B/16, 256 × 256): the default of its builder and converters
ACTR_RELEASED_CONFIG = ACTRReleasedConfig()
