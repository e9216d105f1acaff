"""Model registry and analysis services, for callers that import them from one place.

They live in ``inference.registry`` (model versions: register, check, activate, load) and
``inference.analysis`` (claim, analyse and store patches; the reconciler).
"""

from inference import core  # noqa: F401 - re-exported: tests replace core.Predictor through it
from inference.analysis import (  # noqa: F401
    INPUT_STATS,
    MAX_ATTEMPTS,
    analysis_reconcile,
    case_status_refresh,
    input_stats,
    prediction_run,
)
from inference.registry import (  # noqa: F401
    ModelRejected,
    ModelUnavailable,
    _models,
    model_activate,
    model_check,
    model_load_active,
    model_register,
    shadow_evaluate,
    trained_on,
)
