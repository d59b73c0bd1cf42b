"""PCK@α, its thresholds, scoring protocols, the reference predictors and the evaluator (results as ``xarray``).

Every evaluation scores the model beside two reference predictors on the same pairs: identity
(zero motion) and a classical geometric peer (ORB + RANSAC homography), with paired bootstrap
intervals on the differences. See ``docs/evaluation.md`` for the protocols side by side, the
threshold definitions and the references.
"""

from actr_core.metrics.bootstrap import BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, paired_bootstrap
from actr_core.metrics.evaluate import (
    DEFAULT_ALPHAS,
    MODEL,
    SPAIR_FLAGS,
    PCKDifference,
    evaluate,
    format_table,
    keypoint_correctness,
    load_results,
    pck_curve,
    pck_difference,
    results_bytes,
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
from actr_core.metrics.references import (
    CLASSICAL_PEER,
    IDENTITY,
    REFERENCE_LABELS,
    REFERENCE_NAMES,
    ClassicalPeer,
    IdentityPredictor,
    PeerSettings,
    ReferenceOutput,
    best_constant_flow,
    reference_predictor,
)
from actr_core.metrics.thresholds import bbox_threshold, bkp_threshold, img_threshold, rescale_boxes

__all__ = [
    "BOOTSTRAP_LEVEL",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "CLASSICAL_PEER",
    "DEFAULT_ALPHAS",
    "IDENTITY",
    "MODEL",
    "PROTOCOLS",
    "REFERENCE_LABELS",
    "REFERENCE_NAMES",
    "RELEASED",
    "SPAIR_FLAGS",
    "STANDARD",
    "STANDARD_INPUT",
    "ClassicalPeer",
    "IdentityPredictor",
    "KeypointCorrectness",
    "PCKDifference",
    "PeerSettings",
    "ReferenceOutput",
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
    "paired_bootstrap",
    "pck",
    "pck_curve",
    "pck_difference",
    "pck_per_keypoint",
    "best_constant_flow",
    "reference_predictor",
    "rescale_boxes",
    "results_bytes",
    "save_results",
    "score_batch",
    "summarise",
]
