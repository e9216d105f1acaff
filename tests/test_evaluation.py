"""inference.core.evaluation: metrics checked against values computed by hand on tiny examples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference.core.datasets import CANONICAL_CLASSES
from inference.core.evaluation import (
    evaluate,
    expected_calibration_error,
    fit_temperature,
    restrict_to_classes,
    roc_auc_binary,
    save_confusion_matrix,
    save_plots,
    save_reliability_diagram,
    save_roc_curves,
    softmax,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Three classes, six samples.
#   true:      ADI ADI LYM LYM TUM TUM
#   predicted: ADI LYM LYM LYM TUM ADI   (argmax of each row below)
THREE_CLASSES = ["ADI", "LYM", "TUM"]
THREE_LABELS = ["ADI", "ADI", "LYM", "LYM", "TUM", "TUM"]
THREE_PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.1, 0.8],
        [0.5, 0.1, 0.4],
    ]
)


def test_evaluate_three_class_example_matches_hand_computation():
    report = evaluate(THREE_PROBS, THREE_LABELS, THREE_CLASSES)
    # Confusion (rows true, cols predicted): ADI [1,1,0], LYM [0,2,0], TUM [1,0,1].
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert report["n"] == 6
    assert report["classes"] == THREE_CLASSES
    assert report["restricted_to"] is None
    assert report["note"] is None
    # Accuracy: 4 correct of 6.
    assert report["accuracy"] == pytest.approx(0.666667)
    # Precision = diag / column sum: ADI 1/2, LYM 2/3, TUM 1/1.
    # Recall = diag / row sum: ADI 1/2, LYM 2/2, TUM 1/2.
    # F1: ADI 0.5, LYM 2*(2/3)*1/(5/3) = 0.8, TUM 2*1*0.5/1.5 = 2/3.
    expected = {
        "ADI": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "LYM": {"precision": 0.666667, "recall": 1.0, "f1": 0.8, "support": 2},
        "TUM": {"precision": 1.0, "recall": 0.5, "f1": 0.666667, "support": 2},
    }
    assert report["per_class"] == expected
    # Balanced accuracy = mean recall = (0.5 + 1 + 0.5) / 3.
    assert report["balanced_accuracy"] == pytest.approx(0.666667)
    assert report["macro_recall"] == pytest.approx(0.666667)
    # Macro precision = (0.5 + 2/3 + 1) / 3 = 0.722222; macro F1 = (0.5 + 0.8 + 2/3) / 3 = 0.655556.
    assert report["macro_precision"] == pytest.approx(0.722222)
    assert report["macro_f1"] == pytest.approx(0.655556)
    # One-vs-rest AUC, counting positive-over-negative wins:
    #   ADI column: positives 0.7, 0.3 vs negatives 0.1, 0.2, 0.1, 0.5 -> (4 + 3) / 8 = 0.875
    #   LYM column: positives 0.8, 0.5 vs negatives 0.2, 0.6, 0.1, 0.1 -> (4 + 3) / 8 = 0.875
    #   TUM column: positives 0.8, 0.4 vs negatives 0.1, 0.1, 0.1, 0.3 -> 8 / 8 = 1.0
    assert report["roc_auc"] == {"ADI": 0.875, "LYM": 0.875, "TUM": 1.0}
    assert report["macro_roc_auc"] == pytest.approx(0.916667)
    # Top-label confidences / correct: 0.7 y, 0.6 n, 0.8 y, 0.5 y, 0.8 y, 0.5 n. With 15 bins the
    # distinct confidences fall in different bins; sum over bins of |#correct - sum(confidence)| / n:
    #   0.5-bin |1 - 1.0| = 0, 0.6-bin |0 - 0.6| = 0.6, 0.7-bin |1 - 0.7| = 0.3, 0.8-bin |2 - 1.6| = 0.4
    #   ECE = (0 + 0.6 + 0.3 + 0.4) / 6 = 0.216667
    assert report["ece"] == pytest.approx(0.216667)


def test_evaluate_report_is_plain_json_serialisable():
    report = evaluate(THREE_PROBS, np.array(THREE_LABELS), THREE_CLASSES)
    assert json.loads(json.dumps(report)) == report
    assert type(report["accuracy"]) is float
    assert type(report["confusion_matrix"][0][0]) is int


def test_class_never_predicted_has_zero_precision():
    # TUM is never the argmax: its precision (0 / 0) is reported as 0.0, as is its F1.
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.6, 0.1, 0.3]])
    report = evaluate(probs, ["ADI", "LYM", "TUM"], THREE_CLASSES)
    assert report["per_class"]["TUM"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]


def test_roc_auc_counts_ties_as_half():
    # Ranks 1, 3, 2, 4; positives' rank sum 2 + 4 = 6; U = 6 - 2*3/2 = 3; AUC = 3 / (2*2) = 0.75.
    assert roc_auc_binary(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # Positive 0.6 beats 0.2 and ties 0.6 (1.5); positive 0.9 beats both (2): 3.5 / 4 = 0.875.
    assert roc_auc_binary(np.array([0.2, 0.6, 0.6, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.875)
    # All scores tied: every pair counts one half.
    assert roc_auc_binary(np.full(4, 0.5), np.array([0, 1, 0, 1])) == pytest.approx(0.5)
    # Perfectly reversed ranking.
    assert roc_auc_binary(np.array([0.9, 0.8, 0.2, 0.1]), np.array([False, False, True, True])) == 0.0


def test_roc_auc_is_none_with_a_single_class():
    assert roc_auc_binary(np.array([0.1, 0.9]), np.array([1, 1])) is None
    assert roc_auc_binary(np.array([0.1, 0.9]), np.array([0, 0])) is None


def test_ece_hand_computed_on_two_bins():
    probs = np.array(
        [
            [0.40, 0.30, 0.30],  # confidence 0.40, label 0: correct
            [0.45, 0.35, 0.20],  # confidence 0.45, label 1: wrong
            [0.90, 0.05, 0.05],  # confidence 0.90, label 0: correct
            [0.10, 0.70, 0.20],  # confidence 0.70, label 2: wrong
        ]
    )
    labels = np.array([0, 1, 0, 2])
    # Bin (0, 0.5]: confidences 0.40, 0.45 -> mean 0.425, accuracy 0.5, gap 0.075, weight 2/4.
    # Bin (0.5, 1]: confidences 0.90, 0.70 -> mean 0.800, accuracy 0.5, gap 0.300, weight 2/4.
    # ECE = 0.5 * 0.075 + 0.5 * 0.3 = 0.1875.
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(0.1875)
    # With 15 bins every sample has its own bin: (0.6 + 0.45 + 0.1 + 0.7) / 4 = 0.4625.
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4625)


def test_ece_bins_are_closed_on_the_right():
    # Confidence exactly 0.5 belongs to (0, 0.5], with the 0.4 sample: mean 0.45, accuracy 1 -> gap 0.55.
    # Confidence 1.0 belongs to (0.5, 1] alone, correct -> gap 0. ECE = (2/3) * 0.55 = 0.366667.
    probs = np.array([[0.5, 0.25, 0.25], [0.4, 0.3, 0.3], [1.0, 0.0, 0.0]])
    assert expected_calibration_error(probs, np.array([0, 0, 0]), bins=2) == pytest.approx(0.55 * 2 / 3)


def test_restrict_nine_class_row_to_norm_and_tum_renormalises():
    row = np.array([[0.1, 0.05, 0.05, 0.1, 0.1, 0.1, 0.3, 0.1, 0.1]])  # NORM 0.3, TUM 0.1
    restricted = restrict_to_classes(row, CANONICAL_CLASSES, ["NORM", "TUM"])
    # 0.3 / 0.4 and 0.1 / 0.4.
    np.testing.assert_allclose(restricted, [[0.75, 0.25]])
    # Columns follow the model's order whatever order `keep` lists them in.
    np.testing.assert_allclose(restrict_to_classes(row, CANONICAL_CLASSES, ["TUM", "NORM"]), [[0.75, 0.25]])


def test_restrict_row_without_kept_mass_becomes_uniform():
    row = np.zeros((1, 9))
    row[0, 0] = 1.0  # all mass on ADI
    np.testing.assert_allclose(restrict_to_classes(row, CANONICAL_CLASSES, ["NORM", "TUM"]), [[0.5, 0.5]])


def test_restrict_rejects_classes_outside_the_model():
    with pytest.raises(ValueError, match="XYZ"):
        restrict_to_classes(np.full((1, 9), 1 / 9), CANONICAL_CLASSES, ["NORM", "XYZ"])


def test_evaluate_restricts_to_present_classes_and_says_so():
    probs = np.array(
        [
            [0.1, 0.05, 0.05, 0.1, 0.1, 0.1, 0.3, 0.1, 0.1],  # NORM/TUM -> 0.75/0.25, true NORM
            [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.15, 0.2],  # NORM/TUM -> 0.2/0.8, true TUM
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.4, 0.0, 0.6],  # NORM/TUM -> 0.4/0.6, true NORM
        ]
    )
    report = evaluate(probs, ["NORM", "TUM", "NORM"], list(CANONICAL_CLASSES))
    assert report["classes"] == ["NORM", "TUM"]
    assert report["restricted_to"] == ["NORM", "TUM"]
    assert report["note"] == "scores restricted to the 2 classes present in the data and renormalised"
    # Argmax after restriction: NORM, TUM, TUM; the third row is a NORM called TUM.
    assert report["confusion_matrix"] == [[1, 1], [0, 1]]
    assert report["accuracy"] == pytest.approx(0.666667)
    # TUM scores 0.25 (NORM), 0.8 (TUM), 0.6 (NORM): the TUM sample beats both -> 1.0.
    assert report["roc_auc"] == {"NORM": 1.0, "TUM": 1.0}
    # Binary: macro AUC is the AUC of the second class (TUM) against the first.
    assert report["macro_roc_auc"] == 1.0


def test_evaluate_unknown_label_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="XYZ"):
        evaluate(THREE_PROBS, ["ADI", "ADI", "LYM", "LYM", "TUM", "XYZ"], THREE_CLASSES)


def test_evaluate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        evaluate(THREE_PROBS[:, :2], THREE_LABELS, THREE_CLASSES)


def test_softmax_is_stable_and_rows_sum_to_one():
    logits = np.array([[1000.0, 1000.0, 0.0], [-1000.0, 0.0, 1000.0]])
    probs = softmax(logits)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[0], [0.5, 0.5, 0.0], atol=1e-12)
    # A higher temperature flattens the distribution.
    assert softmax(np.array([2.0, 0.0]), temperature=10.0)[0] < softmax(np.array([2.0, 0.0]))[0]
    with pytest.raises(ValueError):
        softmax(logits, temperature=0.0)


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def test_temperature_scaling_fixes_overconfident_logits_and_recovers_the_scale():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 1.5, size=(3000, 4))
    # Labels drawn from softmax(logits) make these logits calibrated at T = 1 by construction.
    probs = softmax(logits)
    labels = np.array([rng.choice(4, p=row) for row in probs])
    overconfident = logits * 5.0

    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(5.0, rel=0.15)

    before, after = softmax(overconfident), softmax(overconfident, temperature)
    assert expected_calibration_error(after, labels) < expected_calibration_error(before, labels) / 3
    assert _nll(after, labels) < _nll(before, labels)
    # Deterministic: the same data give the same temperature.
    assert fit_temperature(overconfident, labels) == temperature


def test_fit_temperature_returns_one_for_fewer_than_two_samples():
    assert fit_temperature(np.array([[3.0, 0.0]]), np.array([0])) == 1.0
    assert fit_temperature(np.zeros((0, 2)), np.array([], dtype=int)) == 1.0


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)


def test_plots_write_non_empty_png_files(tmp_path):
    report = evaluate(THREE_PROBS, THREE_LABELS, THREE_CLASSES)
    paths = save_plots(tmp_path / "plots", THREE_PROBS, THREE_LABELS, report)
    assert [p.name for p in paths] == ["confusion_matrix.png", "roc.png", "reliability.png"]
    for path in paths:
        _assert_png(path)


def test_individual_plot_functions_write_png_for_restricted_report(tmp_path):
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(size=(40, 9)))
    labels = rng.choice(["NORM", "TUM"], size=40)
    report = evaluate(probs, labels, list(CANONICAL_CLASSES))
    scored = restrict_to_classes(probs, CANONICAL_CLASSES, report["classes"])
    truth = np.array([report["classes"].index(label) for label in labels])
    _assert_png(save_confusion_matrix(tmp_path / "cm.png", report))
    _assert_png(save_roc_curves(tmp_path / "roc.png", scored, labels, report["classes"]))
    _assert_png(save_reliability_diagram(tmp_path / "rel.png", scored, truth, bins=10))
