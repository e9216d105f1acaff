"""Django-free classifier core: datasets, preprocessing, quality control, prediction, training.

Nothing in this package imports Django, so it can be used from a notebook or a script.
TensorFlow/Keras and LiteRT are imported lazily inside the functions that need them, so
importing ``inference.core`` stays cheap for web processes and ``manage.py``.
"""

from inference.core.datasets import CANONICAL_CLASSES, LabelledImage, scan_folder
from inference.core.model import PatchPrediction, Predictor, load_model, predict
from inference.core.preprocessing import decode_rgb, preprocess
from inference.core.quality import QualityResult, assess

__all__ = [
    "CANONICAL_CLASSES",
    "LabelledImage",
    "PatchPrediction",
    "Predictor",
    "QualityResult",
    "assess",
    "decode_rgb",
    "load_model",
    "predict",
    "preprocess",
    "scan_folder",
]
