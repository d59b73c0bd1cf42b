"""A tiny ACTR-as-released composition shared by the tests (imported as ``tiny_released``).

48-px native ViT (3×3 grid) resampled to 64-px input (4×4 tokens), 2 blocks, 16×16 flow; windows
8 and 4 as released.
"""

import dataclasses
import warnings

from actr_core.models import ACTR, ACTRReleasedConfig, actr_released

TINY_RELEASED = ACTRReleasedConfig(
    backbone="vit_small_patch16_224",
    backbone_kwargs=(("depth", 1), ("embed_dim", 32), ("num_heads", 2), ("img_size", 48)),
    image_size=64,
    depth=2,
    num_heads=2,
    guidance_dim=14,
    sr_heads=2,
    sr_hidden=8,
    channel_reduction=4,
)


def tiny_released_model(**changes) -> ACTR:
    """ACTR as released (:func:`actr_released`) of :data:`TINY_RELEASED` with ``changes``, without the
    random-init warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return actr_released(dataclasses.replace(TINY_RELEASED, **changes))
