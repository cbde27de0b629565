"""Deprecated: the checkpoint functions moved to :mod:`qarep_det.ultralytics.checkpoint`; load a detector with the
public :func:`qarep_det.load_detector`. This alias stays for one release (0.3) and warns on import."""

import warnings

from qarep_det.ultralytics.checkpoint import (  # noqa: F401  (re-exported under the old path)
    FusedCheckpoint,
    checkpoint_paths,
    load_detector,
    load_fused,
    model_name,
    save_detector,
)

warnings.warn(
    "qarep_det.integrations.checkpoint moved to qarep_det.ultralytics.checkpoint; use qarep_det.load_detector "
    "(this alias goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
