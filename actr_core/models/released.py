"""ACTR as released: the composition of the public code, loading its checkpoints.

Axis legend: b batch · H W input frame (256 × 256) · hs ws source token grid (16 × 16) · ht wt
target token grid · h w flow grid (64 × 64) · m paths (= blocks) · n tokens (1 + hs·ws) ·
c channels · k guidance channels.

:class:`ACTRReleased` reproduces the released ``ACTR.forward`` (github YXSUNMADMAX/ACTR,
``models/ACTR.py``): the same numbers, with only the parameters its forward pass uses. It is built
from the library's blocks with the released variants of :mod:`actr_core.blocks.released` swapped
in. :func:`load_official_actr` reads a released checkpoint (``model_best.pth`` with a
``state_dict`` entry, or a bare state dict), maps its key names onto ours, drops the keys the
released code creates but never uses, and loads strictly. docs/models.md lists every key.

Convention:
    ``output.flow`` is ``(b, 2, 64, 64)`` for a 256 × 256 pair, on the source grid, pointing into
    the target, in cells of the 64 × 64 grid, exactly the released output. These units are pixels
    of the H/4 grid of the library convention. The arithmetic inside follows the released code,
    which mixes conventions (``align_corners=True`` soft-argmax grid and guidance upsampling,
    nearest flow upsampling); see :mod:`actr_core.blocks.released` and docs/models.md.
"""

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from actr_core.blocks.released import (
    NoTargetReweighting,
    ReleasedAsymmetricBlock,
    ReleasedFlowRefiner,
    ReleasedGuidance,
    ReleasedSoftArgmax,
    ReleasedTargetReweighting,
    dino_pos_embed_interpolation,
    nearest_upsample_flow,
    released_epe_loss,
)
from actr_core.blocks.windows import relative_position_index
from actr_core.models.backbones import ViTBackbone, create_vit, read_checkpoint
from actr_core.models.base import Matcher, MatchOutput, check_image_pair
from actr_core.models.registry import register_model

__all__ = [
    "ACTRReleasedConfig",
    "ACTRReleased",
    "actr_released",
    "load_official_actr",
    "official_key_to_ours",
    "our_key_to_official",
    "official_state_dict_shapes",
    "official_parameter_count",
    "to_official_state_dict",
    "OfficialCheckpointError",
]


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
    refine_chunk: int = 1  # execution only (no effect on values): paths refined per call, 0 = all in
    #   one call. The released ACTR.forward refines one path at a time; 1 keeps that working set
    #   (peak memory) and is no slower on CPU (docs/benchmarks.md)

    @property
    def sr_dim(self) -> int:
        """Channels of the refiner: 2 flow channels + the guidance (96 as released)."""
        return self.guidance_dim + 2


class OfficialCheckpointError(ValueError):
    """A released checkpoint does not fit :class:`ACTRReleased` (names the offending keys)."""


class ACTRReleased(Matcher):
    """ACTR exactly as the released code computes it (used parameters only).

    ``forward(src, trg)`` takes ImageNet-normalised ``config.image_size``² images (256 × 256 as
    released) and returns a :class:`MatchOutput` with ``flow`` ``(b, 2, 64, 64)``,
    ``flows_per_path`` ``(b, 6, 2, 64, 64)``, ``coarse_flows`` ``(b, 6, 2, 16, 16)`` (16-grid
    cells) and ``correlations`` ``(b, 6, 16, 16, 16, 16)`` (the head-summed cross-attention, [cls]
    removed). ``loss`` is the released end-point error pooled over the batch's valid cells.
    """

    def __init__(self, config: ACTRReleasedConfig = ACTRReleasedConfig(), *, backbone: ViTBackbone | None = None):
        super().__init__()
        self.config = config
        if backbone is None:
            backbone = create_vit(
                config.backbone, resample_pos_embed=dino_pos_embed_interpolation, **dict(config.backbone_kwargs)
            )
        self.backbone = backbone
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
        patch = backbone.patch_size
        if config.image_size % patch:
            raise ValueError(f"image_size = {config.image_size} is not a multiple of the patch size {patch}")
        self.grid = (config.image_size // patch, config.image_size // patch)
        num_tokens = 1 + self.grid[0] * self.grid[1]
        dim = backbone.embed_dim
        self.decoder = nn.ModuleList(
            ReleasedAsymmetricBlock(
                dim,
                config.num_heads,
                num_tokens,
                mlp_ratio=config.mlp_ratio,
                norm_eps=config.norm_eps,
                # the released last block returns before reweighting the target
                reweighting=ReleasedTargetReweighting(dim) if i < config.depth - 1 else NoTargetReweighting(),
            )
            for i in range(config.depth)
        )
        self.soft_argmax = ReleasedSoftArgmax(self.grid, beta=config.beta)
        self.guidance = ReleasedGuidance(
            dim, config.guidance_dim, factor=config.flow_upsample, dropout=config.guidance_dropout
        )
        self.refiner = ReleasedFlowRefiner(
            config.sr_dim,
            config.sr_heads,
            config.sr_windows,
            rounds=config.sr_rounds,
            hidden=config.sr_hidden,
            mlp_ratio=config.sr_mlp_ratio,
            reduction=config.channel_reduction,
            chunk=config.refine_chunk,
        )

    def forward(self, src: Float[Tensor, "b 3 H W"], trg: Float[Tensor, "b 3 H W"]) -> MatchOutput:
        size = check_image_pair(src, trg, multiple=self.backbone.patch_size)
        expected = (self.config.image_size, self.config.image_size)
        if size != expected:
            raise ValueError(
                f"src and trg are {size[0]}x{size[1]}: ACTR as released takes {expected[0]}x{expected[1]} "
                "input only (its positional encodings have a fixed length); resize the images first"
            )
        b = src.shape[0]
        hs, ws = self.grid
        tokens = self.backbone(torch.cat((src, trg)))  # one pass for both: (2b, n, c)
        s, t = tokens[:b], tokens[b:]
        attentions = []
        for block in self.decoder:
            s, t, attention = block(s, t)
            attentions.append(attention[:, 1:, 1:])  # drop the [cls] row and column
        corr = rearrange(
            torch.stack(attentions, dim=1), "b m (hs ws) (ht wt) -> b m hs ws ht wt", hs=hs, ws=ws, ht=hs
        )
        m = corr.shape[1]
        coarse = self.soft_argmax(rearrange(corr, "b m hs ws ht wt -> (b m) hs ws ht wt"))
        flow_up = nearest_upsample_flow(coarse, self.config.flow_upsample)
        guidance = self.guidance(s[:, 1:], self.grid)  # from the last block's source tokens, shared by all paths
        flows = self.refiner(flow_up, guidance)  # the (b m) flows, guidance b: computed once, never repeated
        flows = rearrange(flows, "(b m) two h w -> b m two h w", m=m)
        return MatchOutput(
            flow=flows.mean(dim=1),
            flows_per_path=flows,
            coarse_flows=rearrange(coarse, "(b m) two h w -> b m two h w", m=m),
            correlations=corr,
        )

    def loss(self, output: MatchOutput, batch: Mapping[str, Any]) -> Float[Tensor, ""]:
        """Released objective: end-point error of ``output.flow`` against ``batch["flow"]``, averaged
        over all ``batch["valid_flow"]`` cells of the batch (units: pixels of the H/4 grid)."""
        target, valid = batch["flow"], batch["valid_flow"]
        if tuple(target.shape) != tuple(output.flow.shape):
            raise ValueError(
                f'batch["flow"] has shape {tuple(target.shape)} but the model predicts {tuple(output.flow.shape)}'
            )
        return released_epe_loss(output.flow, target, valid)


@register_model(
    "actr_released",
    description="ACTR as released (ViT-B/16, 256x256), used parameters only",
    paper_row="ACTR",
    paper_params_m=172.8,
)
def actr_released(
    config: ACTRReleasedConfig = ACTRReleasedConfig(),
    *,
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    checkpoint_key: str | None = None,
) -> ACTRReleased:
    """ACTR as released, with an optional local backbone checkpoint (e.g. iBOT ViT-B/16, which the
    released training starts from); the decoder and refiner are randomly initialised as released."""
    backbone = create_vit(
        config.backbone,
        weights=backbone_weights,
        checkpoint_key=checkpoint_key,
        resample_pos_embed=dino_pos_embed_interpolation,
        **dict(config.backbone_kwargs),
    )
    return ACTRReleased(config, backbone=backbone)


# ----------------------------------------------------------------------------------------------
# released key names ↔ ours

_TOP_RENAMES = (  # (released prefix or name, ours)
    ("feature_extraction.backbone.", "backbone."),
    ("refine_proj_query_feat.0.", "guidance.proj."),
    ("refine2.", "refiner.head."),
    ("x_normal", "soft_argmax.x_grid"),
    ("y_normal", "soft_argmax.y_grid"),
)
_BLOCK_RENAMES = (
    ("sattn.", "self_attn."),
    ("cattn.", "cross_attn."),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
    ("mlp.", "mlp."),
    ("pos_embed", "source_pos"),
    ("spatial_attention.weight", "reweighting.weight"),
)
_SWIN_RENAMES = (
    ("0.transformer.layers.0.blocks.0.", "block."),
    ("0.transformer.norm.", "norm."),
    ("1.fc.0.", "channel_attention.reduce."),
    ("1.fc.2.", "channel_attention.expand."),
)
_RELEASED_BLOCK = re.compile(r"decoder\.(?:blocks\.(\d+)|last_block\.0)\.(.+)")
_RELEASED_SWIN = re.compile(r"refine_swin_decoder_(\d+)_(\d+)\.(.+)")
_OUR_BLOCK = re.compile(r"decoder\.(\d+)\.(.+)")
_OUR_SWIN = re.compile(r"refiner\.rounds\.(\d+)\.branches\.(\d+)\.(.+)")
_SWIN_INDEX_KEY = "0.transformer.layers.0.blocks.0.attn.relative_position_index"

#: released keys never used by its forward pass (accepted and dropped by load_official_actr)
UNUSED_OFFICIAL_KEYS = (
    r"decoder\.(blocks\.\d+|last_block\.0)\.(mlp2\.fc[12]|norm3|norm4)\.(weight|bias)",  # per block
    r"decoder\.last_block\.0\.spatial_attention\.weight",  # the last block never reweights
    r"decoder\.pos_embed_[xy]",
    r"decoder\.(proj|norm)\.(weight|bias)",
    r"learn_parm",
)
#: released buffers that are derived constants (checked against ours, then dropped)
DERIVED_OFFICIAL_KEYS = (r"refine_swin_decoder_\d+_\d+\.0\.transformer\.layers\.0\.blocks\.0\.attn\.relative_position_index",)


def _rename(key: str, renames: tuple[tuple[str, str], ...], *, reverse: bool = False) -> str | None:
    for theirs, ours in renames:
        old, new = (ours, theirs) if reverse else (theirs, ours)
        if old.endswith(".") and key.startswith(old):
            return new + key[len(old) :]
        if key == old:
            return new
    return None


def _window_group(window: int, config: ACTRReleasedConfig) -> int:
    """Released branch names number the windows from the smallest: ``_1_`` = 4, ``_2_`` = 8."""
    return sorted(config.sr_windows).index(window) + 1


def official_key_to_ours(key: str, config: ACTRReleasedConfig = ACTRReleasedConfig()) -> str | None:
    """Our name for a released state-dict key; ``None`` for a key that is dropped (unused or derived).

    Raises :class:`OfficialCheckpointError` for a key the released model does not have.
    """
    if any(re.fullmatch(p, key) for p in UNUSED_OFFICIAL_KEYS + DERIVED_OFFICIAL_KEYS):
        return None
    if (match := _RELEASED_BLOCK.fullmatch(key)) is not None:
        index = int(match.group(1)) if match.group(1) is not None else config.depth - 1
        sub = _rename(match.group(2), _BLOCK_RENAMES)
        if sub is not None and index < config.depth:
            return f"decoder.{index}.{sub}"
    elif (match := _RELEASED_SWIN.fullmatch(key)) is not None:
        group, round_, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        windows = sorted(config.sr_windows)
        sub = _rename(rest, _SWIN_RENAMES)
        if sub is not None and 1 <= group <= len(windows) and 1 <= round_ <= config.sr_rounds:
            branch = config.sr_windows.index(windows[group - 1])
            return f"refiner.rounds.{round_ - 1}.branches.{branch}.{sub}"
    elif (ours := _rename(key, _TOP_RENAMES)) is not None:
        return ours
    raise OfficialCheckpointError(f"unexpected key {key!r}: not a key of the released ACTR")


def our_key_to_official(key: str, config: ACTRReleasedConfig = ACTRReleasedConfig()) -> str:
    """The released name of one of our state-dict keys (inverse of :func:`official_key_to_ours`)."""
    if (match := _OUR_BLOCK.fullmatch(key)) is not None:
        index = int(match.group(1))
        sub = _rename(match.group(2), _BLOCK_RENAMES, reverse=True)
        where = "last_block.0" if index == config.depth - 1 else f"blocks.{index}"
        if sub is not None:
            return f"decoder.{where}.{sub}"
    elif (match := _OUR_SWIN.fullmatch(key)) is not None:
        round_, branch, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        sub = _rename(rest, _SWIN_RENAMES, reverse=True)
        if sub is not None:
            group = _window_group(config.sr_windows[branch], config)
            return f"refine_swin_decoder_{group}_{round_ + 1}.{sub}"
    elif (theirs := _rename(key, _TOP_RENAMES, reverse=True)) is not None:
        return theirs
    raise ValueError(f"{key!r} has no released counterpart")


def _dropped_official_shapes(model: ACTRReleased) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Released keys we do not hold, with (shape, is_parameter), derived from the model's sizes."""
    cfg = model.config
    dim = model.backbone.embed_dim
    hidden = int(dim * cfg.mlp_ratio)
    grid = model.grid[0]
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for i in range(cfg.depth):
        where = "last_block.0" if i == cfg.depth - 1 else f"blocks.{i}"
        for name, shape in (
            ("norm3.weight", (dim,)),
            ("norm3.bias", (dim,)),
            ("norm4.weight", (dim,)),
            ("norm4.bias", (dim,)),
            ("mlp2.fc1.weight", (hidden, dim)),
            ("mlp2.fc1.bias", (hidden,)),
            ("mlp2.fc2.weight", (dim, hidden)),
            ("mlp2.fc2.bias", (dim,)),
        ):
            out[f"decoder.{where}.{name}"] = (shape, True)
    out["decoder.last_block.0.spatial_attention.weight"] = ((1, 1, dim), True)
    out["decoder.pos_embed_x"] = ((1, dim // 2, 1, grid), True)
    out["decoder.pos_embed_y"] = ((1, dim // 2, grid, 1), True)
    out["decoder.proj.weight"] = ((grid * grid, dim), True)
    out["decoder.proj.bias"] = ((grid * grid,), True)
    out["decoder.norm.weight"] = ((dim,), True)
    out["decoder.norm.bias"] = ((dim,), True)
    out["learn_parm"] = ((), True)
    for window in cfg.sr_windows:
        for round_ in range(cfg.sr_rounds):
            key = f"refine_swin_decoder_{_window_group(window, cfg)}_{round_ + 1}.{_SWIN_INDEX_KEY}"
            out[key] = ((window * window, window * window), False)
    return out


def official_state_dict_shapes(model: ACTRReleased) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict the released code would have for ``model``'s sizes."""
    shapes = {our_key_to_official(k, model.config): tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update({k: shape for k, (shape, _) in _dropped_official_shapes(model).items()})
    return shapes


def official_parameter_count(model: ACTRReleased) -> int:
    """Parameters of the released model of ``model``'s sizes, unused ones included (the released
    soft-argmax grids are parameters there, buffers here); 172,810,369 for the released ACTR."""
    ours = sum(p.numel() for p in model.parameters())
    grids = model.soft_argmax.x_grid.numel() + model.soft_argmax.y_grid.numel()
    dropped = sum(
        int(torch.Size(shape).numel()) for shape, is_param in _dropped_official_shapes(model).values() if is_param
    )
    return ours + grids + dropped


def to_official_state_dict(model: ACTRReleased) -> dict[str, Tensor]:
    """``model``'s weights under the released names, with the unused released keys filled (zeros for
    the unused parameters, the derived Swin indices computed), loadable by the released code."""
    state = {our_key_to_official(k, model.config): v.detach().clone() for k, v in model.state_dict().items()}
    ref = next(iter(model.parameters()))
    for key, (shape, is_param) in _dropped_official_shapes(model).items():
        if is_param:
            state[key] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        else:
            window = int(round(shape[0] ** 0.5))
            state[key] = relative_position_index(window, device=ref.device)
    return state


def _unwrap_checkpoint(raw: Mapping[str, Any]) -> dict[str, Tensor]:
    if isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    state = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise OfficialCheckpointError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    return state


def load_official_actr(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    config: ACTRReleasedConfig = ACTRReleasedConfig(),
    weights_only: bool = True,
) -> ACTRReleased:
    """Build :class:`ACTRReleased` and load a released checkpoint into it, strictly.

    Accepts ``model_best.pth`` (a dict with a ``state_dict`` entry, as ``train_DP.py`` saves it), a
    bare state dict, or either already loaded; strips ``module.`` (DataParallel). Every released key
    must be known: it is renamed onto ours (:func:`official_key_to_ours`), or dropped when the
    released forward never uses it (``UNUSED_OFFICIAL_KEYS``: per-block ``mlp2``/``norm3``/``norm4``,
    the last block's ``spatial_attention``, ``decoder.pos_embed_x/y``, ``decoder.proj``,
    ``decoder.norm``, ``learn_parm``) or when it is a derived constant that must equal ours
    (``DERIVED_OFFICIAL_KEYS``: the Swin ``relative_position_index`` buffers). The released
    soft-argmax grids ``x_normal``/``y_normal`` are loaded into our grid buffers: they are trainable
    in the released code, so a trained checkpoint may hold values other than ``linspace(−1, 1)``.

    Raises :class:`OfficialCheckpointError` (a ``ValueError``) for unknown or missing keys, for
    derived buffers that differ, and for wrong shapes, listing the first offending keys. The model
    is created on the meta device and takes the checkpoint's tensors (device and dtype as loaded;
    an in-memory state dict is copied first).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state = _unwrap_checkpoint(read_checkpoint(path_or_state_dict, weights_only=weights_only))
    else:  # copies, so that the model never shares storage with the caller's tensors
        state = {k: v.clone() for k, v in _unwrap_checkpoint(path_or_state_dict).items()}
    with torch.device("meta"):
        model = ACTRReleased(
            config,
            backbone=create_vit(
                config.backbone,
                resample_pos_embed=dino_pos_embed_interpolation,
                warn_random_init=False,
                **dict(config.backbone_kwargs),
            ),
        )
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unknown, derived_bad = [], []
    dropped = _dropped_official_shapes(model)
    for key, value in state.items():
        try:
            ours = official_key_to_ours(key, config)
        except OfficialCheckpointError:
            unknown.append(key)
            continue
        if ours is None:
            if key in dropped and not dropped[key][1]:
                window = int(round(dropped[key][0][0] ** 0.5))
                if value.is_meta:
                    continue
                if not torch.equal(value.cpu(), relative_position_index(window)):
                    derived_bad.append(key)
            continue
        mapped[ours] = value
    if unknown:
        raise OfficialCheckpointError(
            f"{len(unknown)} keys are not keys of the released ACTR, first: {unknown[:5]}"
        )
    if derived_bad:
        raise OfficialCheckpointError(f"derived buffers differ from the released definition: {derived_bad[:5]}")
    missing = [our_key_to_official(k, config) for k in own if k not in mapped]
    if missing:
        raise OfficialCheckpointError(f"{len(missing)} released keys are missing, first: {missing[:5]}")
    wrong = [k for k in own if tuple(mapped[k].shape) != tuple(own[k].shape)]
    if wrong:
        listed = ", ".join(
            f"{our_key_to_official(k, config)}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
            for k in wrong[:5]
        )
        raise OfficialCheckpointError(f"{len(wrong)} keys have wrong shapes, first: {listed}")
    model.load_state_dict(mapped, strict=True, assign=True)
    leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover and not all(v.is_meta for v in mapped.values()):
        raise OfficialCheckpointError(f"tensors left without values after loading: {leftover[:5]}")
    return model
