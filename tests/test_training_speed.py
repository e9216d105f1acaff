"""Training speed: thread budgets, and the head phase on cached backbone features."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from inference.core.datasets import scan_folder
from inference.core.threads import ThreadPlan, available_cpus, thread_plan
from inference.core.training import TrainingConfig, _Views, fit, head_view_count
from tests.conftest import FIXTURE_PATCHES, ROOT, shared_data

WEIGHTS = "mobilenetv2-0.35-imagenet/mobilenet_v2_0.35_224_no_top.h5"


def test_thread_plan_gives_loaders_a_thread_a_core_and_tensorflow_half():
    assert thread_plan(2) == ThreadPlan(cpus=2, loaders=2, intra_op=1, inter_op=1, library=1)
    assert thread_plan(1) == ThreadPlan(cpus=1, loaders=1, intra_op=1, inter_op=1, library=1)
    assert (thread_plan(16).loaders, thread_plan(16).intra_op) == (16, 8)
    assert (thread_plan(4, loaders=1).loaders, thread_plan(4, loaders=1).intra_op) == (1, 2)
    assert available_cpus() == len(os.sched_getaffinity(0))
    assert thread_plan().cpus == available_cpus()


def test_configure_threads_reaches_tensorflow_openblas_and_the_environment():
    # A fresh interpreter: the settings are process-wide and TensorFlow takes them only once.
    script = """
import json, os
import numpy
import tensorflow as tf
from inference.core.threads import configure_threads, openblas_threads, thread_plan
applied = configure_threads(thread_plan(4, loaders=3))
print(json.dumps({
    "applied": applied,
    "intra": tf.config.threading.get_intra_op_parallelism_threads(),
    "inter": tf.config.threading.get_inter_op_parallelism_threads(),
    "openblas": openblas_threads(),
    "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                       "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")},
}))
"""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["applied"]["tensorflow"] and (facts["intra"], facts["inter"]) == (2, 1)
    if facts["openblas"] is not None:  # numpy built on OpenBLAS (the PyPI wheels)
        assert facts["applied"]["openblas"] and facts["openblas"] == 1
    assert facts["applied"]["malloc"] == (platform.libc_ver()[0] == "glibc")
    assert facts["env"] == {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TF_NUM_INTRAOP_THREADS": "2",
        "TF_NUM_INTEROP_THREADS": "1",
    }


def test_head_views_stay_within_the_epochs_and_the_memory_limit():
    config = TrainingConfig(classes=("NORM", "TUM"), weights="x", head_views=8, head_epochs=30, feature_cache_mb=2048)
    view = 7 * 7 * 1280 * 2  # one float16 MobileNetV2 feature map: 125 KB
    assert head_view_count(config, 1120, 240, view) == 8  # 1.1 GB
    assert head_view_count(config, 4000, 800, view) == 4  # 8 views would need 4 GB: 4 fit in 2
    assert head_view_count(config, 20_000, 3000, view) == 0  # not one view fits: stream
    assert head_view_count(replace(config, head_epochs=5), 1120, 240, view) == 5
    assert head_view_count(replace(config, augment=False), 1120, 240, view) == 1  # every view is the same
    assert head_view_count(replace(config, head_views=0), 1120, 240, view) == 0


def test_a_training_view_depends_only_on_its_image_and_view_number():
    items = scan_folder(FIXTURE_PATCHES)
    views = _Views(items, TrainingConfig(classes=("NORM", "TUM"), weights="x", seed=4), phase=0)
    first = np.asarray(views.image(2, 5))
    views.image(0, 5), views.image(2, 6)  # other views made in between change nothing
    assert np.array_equal(first, np.asarray(views.image(2, 5)))
    assert not np.array_equal(first, np.asarray(views.image(2, 6)))
    assert np.array_equal(views.batch([2, 0], 5)[0], views.batch([2], 5)[0])


@pytest.mark.slow
def test_cached_head_training_learns_what_streaming_learns():
    data = shared_data()
    images = scan_folder(FIXTURE_PATCHES) + scan_folder(data / "crc-val-he-7k-png", ("NORM", "TUM"))
    config = TrainingConfig(
        classes=("NORM", "TUM"),
        weights=str(data / WEIGHTS),
        head_epochs=3,
        fine_tune_epochs=0,
        batch_size=4,
        val_fraction=0.25,
        test_fraction=0.0,
        seed=3,
        loaders=2,
    )

    def head(**changes):
        model, facts = fit(images, replace(config, **changes), progress=lambda line: None)
        return [np.asarray(w) for w in model.get_layer("class_map").weights], facts

    streamed, streamed_facts = head(head_views=0)
    cached, cached_facts = head(head_views=3, feature_cache_dtype="float32")
    half, half_facts = head(head_views=3, feature_cache_dtype="float16")
    assert streamed_facts["head_features"] == {"views": 0}
    assert cached_facts["head_features"]["views"] == 3 and half_facts["head_features"]["dtype"] == "float16"
    # Same seed, same views: the backbone's features once or every epoch make the same head.
    for a, b in zip(streamed, cached, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for key in ("head_loss", "head_val_loss"):
        np.testing.assert_allclose(streamed_facts["history"][key], cached_facts["history"][key], rtol=1e-4)
        np.testing.assert_allclose(streamed_facts["history"][key], half_facts["history"][key], rtol=1e-3)
    for a, b in zip(streamed, half, strict=True):  # float16 features: rounding, not a different head
        np.testing.assert_allclose(a, b, atol=2e-3)
