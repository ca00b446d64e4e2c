"""Evaluation in memory: FID machinery and reference stats (features), Proximal FID (proximal), the numbers of
`dsd-fast fid` (fid) and the paper's Table 2 for one run, `dsd-fast eval` (table)."""

from .features import (
    REFERENCE_MARKERS,
    check_dim,
    data_features,
    feature_network,
    fid_from_features,
    load_reference,
    observe,
    run_data,
    sampler_features,
    save_reference,
)
from .proximal import PROXIMAL_KEY, features_with_proximal, proximal_corrupt, proximal_features

__all__ = ["PROXIMAL_KEY", "REFERENCE_MARKERS", "check_dim", "data_features", "feature_network",
           "features_with_proximal", "fid_from_features", "load_reference", "observe", "proximal_corrupt",
           "proximal_features", "run_data", "sampler_features", "save_reference"]
