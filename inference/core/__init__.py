"""Django-free classifier core: datasets, preprocessing, model loading, prediction, training.

Nothing in this package imports Django, so it can be used from a notebook or a script.
TensorFlow/Keras are imported lazily inside the functions that need them, so importing
``inference.core`` stays cheap for web processes and ``manage.py``.
"""

from inference.core.datasets import CANONICAL_CLASSES, LabelledImage, scan_folder
from inference.core.model import LoadedModel, PatchPrediction, load_model, predict
from inference.core.preprocessing import decode_rgb, preprocess, quality_check

__all__ = [
    "CANONICAL_CLASSES",
    "LabelledImage",
    "LoadedModel",
    "PatchPrediction",
    "decode_rgb",
    "load_model",
    "predict",
    "preprocess",
    "quality_check",
    "scan_folder",
]
