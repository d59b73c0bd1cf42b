"""PCK@α, its thresholds, scoring protocols and the evaluator (results as ``xarray``).

See ``docs/evaluation.md`` for the protocols side by side and the threshold definitions.
"""

from actr_core.metrics.evaluate import (
    DEFAULT_ALPHAS,
    SPAIR_FLAGS,
    evaluate,
    format_table,
    keypoint_correctness,
    load_results,
    pck_curve,
    save_results,
    score_batch,
    summarise,
)
from actr_core.metrics.pck import KeypointCorrectness, keypoint_distances, pck, pck_per_keypoint
from actr_core.metrics.protocols import (
    PROTOCOLS,
    RELEASED,
    STANDARD,
    STANDARD_INPUT,
    ScoringProtocol,
    get_protocol,
)
from actr_core.metrics.thresholds import bbox_threshold, bkp_threshold, img_threshold, rescale_boxes

__all__ = [
    "DEFAULT_ALPHAS",
    "PROTOCOLS",
    "RELEASED",
    "SPAIR_FLAGS",
    "STANDARD",
    "STANDARD_INPUT",
    "KeypointCorrectness",
    "ScoringProtocol",
    "bbox_threshold",
    "bkp_threshold",
    "evaluate",
    "format_table",
    "get_protocol",
    "img_threshold",
    "keypoint_correctness",
    "keypoint_distances",
    "load_results",
    "pck",
    "pck_curve",
    "pck_per_keypoint",
    "rescale_boxes",
    "save_results",
    "score_batch",
    "summarise",
]
