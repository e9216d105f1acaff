"""Evaluation of a classifier's probabilities: metrics, calibration, temperature scaling and plots.

Everything except the plots is plain numpy (no scipy / scikit-learn), so a report can be computed
wherever the classifier core runs. matplotlib is imported lazily inside the plotting functions,
so importing this module stays cheap for web processes.

Conventions: ``probabilities`` is an ``(n, k)`` array whose rows sum to 1; class columns follow the
model's class order. Integer ``labels`` are column indices; string labels are class names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ECE_BINS = 15
# Search interval for the temperature: wide enough for badly over- or under-confident networks,
# narrow enough that the optimum is never a degenerate 0 or infinity.
TEMPERATURE_MIN = 0.05
TEMPERATURE_MAX = 20.0
_TEMPERATURE_GRID = 49
_GOLDEN_ITERATIONS = 80
_DECIMALS = 6
Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval
BOOTSTRAP_RESAMPLES = 1000
ROC_CURVE_POINTS = 300  # stored curves are thinned to about this many points


def _round(value: float) -> float:
    return round(float(value), _DECIMALS)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``.

    Args:
        logits: ``(n, k)`` (or ``(k,)``) unnormalised scores, any real values.
        temperature: T > 0; T > 1 softens, T < 1 sharpens.

    Returns:
        Array of the same shape with values in [0, 1] whose last axis sums to 1.

    Raises:
        ValueError: temperature is not a positive finite number.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    # Subtracting the row maximum keeps exp() from overflowing without changing the result.
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def _mean_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising the mean NLL of ``softmax(logits / T)``.

    The NLL is convex in 1/T, hence unimodal in log T; a coarse grid on log T followed by a
    golden-section refinement around the best grid point finds the optimum deterministically
    even when the curve is very flat.

    Args:
        logits: ``(n, k)`` pre-softmax scores of a held-out (calibration) set.
        labels: ``(n,)`` integer true-class column indices in ``0..k-1``.

    Returns:
        T in [0.05, 20] (dimensionless); 1.0 when there are fewer than 2 samples.

    Raises:
        ValueError: shapes disagree or a label is out of range.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) < 2:
        return 1.0
    if logits.ndim != 2 or logits.shape[0] != len(labels):
        raise ValueError(f"logits must be (n, k) with n = {len(labels)} labels, got shape {logits.shape}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be column indices in 0..{logits.shape[1] - 1}")

    def objective(log_t: float) -> float:
        return _mean_nll(logits, labels, math.exp(log_t))

    grid = np.linspace(math.log(TEMPERATURE_MIN), math.log(TEMPERATURE_MAX), _TEMPERATURE_GRID)
    values = [objective(float(x)) for x in grid]
    best = int(np.argmin(values))
    low = float(grid[max(best - 1, 0)])
    high = float(grid[min(best + 1, len(grid) - 1)])

    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = high - ratio * (high - low), low + ratio * (high - low)
    f1, f2 = objective(x1), objective(x2)
    for _ in range(_GOLDEN_ITERATIONS):
        if f1 <= f2:
            high, x2, f2 = x2, x1, f1
            x1 = high - ratio * (high - low)
            f1 = objective(x1)
        else:
            low, x1, f1 = x1, x2, f2
            x2 = low + ratio * (high - low)
            f2 = objective(x2)
    # The grid point itself may beat the refined bracket when the optimum sits on the interval edge.
    candidates = [(f1, x1), (f2, x2), (values[best], float(grid[best]))]
    return float(math.exp(min(candidates)[1]))


def _confidence_bins(confidences: np.ndarray, bins: int) -> np.ndarray:
    # Bin i covers (i/B, (i+1)/B]; a confidence of exactly 0 falls in bin 0.
    interior = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.searchsorted(interior, confidences, side="left")


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ECE = sum over bins b of (|b| / n) * |accuracy(b) - mean confidence(b)|, where the
    confidence of a sample is its largest probability and bins split (0, 1] into ``bins``
    equal intervals closed on the right.

    Args:
        probabilities: ``(n, k)`` class probabilities, rows summing to 1.
        labels: ``(n,)`` integer true-class column indices.
        bins: number of equal-width bins (>= 1).

    Returns:
        ECE in [0, 1] (0.0 for no samples).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if bins < 1:
        raise ValueError("bins must be >= 1")
    if len(labels) == 0:
        return 0.0
    confidences = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    index = _confidence_bins(confidences, bins)
    sum_conf = np.bincount(index, weights=confidences, minlength=bins)
    sum_correct = np.bincount(index, weights=correct, minlength=bins)
    # |sum(correct) - sum(conf)| / n equals the count-weighted |acc - conf| of each bin.
    return float(np.abs(sum_correct - sum_conf).sum() / len(labels))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """The bins of a reliability diagram (top-label confidence against accuracy), as plain data.

    Uses the same equal-width bins as ``expected_calibration_error``, so the count-weighted sum
    of ``|accuracy - confidence|`` over the bins, divided by n, is the ECE.

    Args:
        probabilities: ``(n, k)`` class probabilities, rows summing to 1.
        labels: ``(n,)`` integer true-class column indices.
        bins: number of equal-width bins on (0, 1] (>= 1).

    Returns:
        One dict per bin, lowest first: ``lower`` and ``upper`` (confidence bounds, the bin is
        (lower, upper]), ``count``, ``accuracy`` and ``confidence`` (mean top-label probability);
        accuracy and confidence are None for an empty bin.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if bins < 1:
        raise ValueError("bins must be >= 1")
    confidences = probabilities.max(axis=1) if len(labels) else np.zeros(0)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64) if len(labels) else np.zeros(0)
    index = _confidence_bins(confidences, bins)
    counts = np.bincount(index, minlength=bins)
    sum_correct = np.bincount(index, weights=correct, minlength=bins)
    sum_conf = np.bincount(index, weights=confidences, minlength=bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return [
        {
            "lower": _round(edges[i]),
            "upper": _round(edges[i + 1]),
            "count": int(counts[i]),
            "accuracy": _round(sum_correct[i] / counts[i]) if counts[i] else None,
            "confidence": _round(sum_conf[i] / counts[i]) if counts[i] else None,
        }
        for i in range(bins)
    ]


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (e.g. a sensitivity).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0/n or n/n:
    10 of 10 gives (0.722, 1.0), 0 of 10 gives (0.0, 0.278).

    Args:
        successes: number of successes, 0..total.
        total: number of trials (>= 0).
        z: standard normal quantile; the default gives a two-sided 95% interval.

    Returns:
        (lower, upper) in [0, 1]; (0.0, 1.0) when ``total`` is 0 (nothing is known).

    Raises:
        ValueError: counts out of range.
    """
    if total < 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes} of {total}")
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    # Exact 0/n and n/n: the bound on that side is the observed proportion itself.
    lower = 0.0 if successes == 0 else max(0.0, centre - half)
    upper = 1.0 if successes == total else min(1.0, centre + half)
    return _round(lower), _round(upper)


def proportion(successes: int, total: int) -> dict[str, Any]:
    """A proportion with its Wilson 95% interval, as plain data.

    Returns:
        ``value`` (None when ``total`` is 0), ``low``, ``high``, ``successes`` and ``n``.
    """
    low, high = wilson_interval(successes, total)
    return {
        "value": _round(successes / total) if total else None,
        "low": low,
        "high": high,
        "successes": int(successes),
        "n": int(total),
    }


def _average_ranks(values: np.ndarray) -> np.ndarray:
    # 1-based ranks; tied values share the mean of the ranks they span.
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc_binary(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    Equals the probability that a random positive scores higher than a random negative,
    counting ties as one half (average ranks).

    Args:
        scores: ``(n,)`` real scores, higher meaning "more positive".
        positives: ``(n,)`` booleans (or 0/1) marking the positive samples.

    Returns:
        AUC in [0, 1], or None when only one class is present (AUC undefined).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives).astype(bool)
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} differ in shape")
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_interval(
    scores: np.ndarray,
    positives: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """ROC AUC with a stratified percentile-bootstrap confidence interval.

    Positives and negatives are resampled separately (each keeps its size), so every resample
    has both classes and a defined AUC. The same seed gives the same interval.

    Args:
        scores: ``(n,)`` real scores, higher meaning "more positive".
        positives: ``(n,)`` booleans marking the positive samples.
        resamples: number of bootstrap resamples (>= 1).
        seed: seed of the random generator.
        level: coverage of the interval, in (0, 1).

    Returns:
        ``value`` (AUC on the data, or None with only one class present), ``low`` and ``high``
        (percentile bounds, None when the AUC is undefined), ``resamples``, ``seed``, ``level``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives).astype(bool)
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError("resamples must be >= 1 and level in (0, 1)")
    value = roc_auc_binary(scores, positives)
    result: dict[str, Any] = {
        "value": None,
        "low": None,
        "high": None,
        "resamples": resamples,
        "seed": seed,
        "level": level,
    }
    if value is None:
        return result
    pos, neg = scores[positives], scores[~positives]
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(len(pos), dtype=bool), np.zeros(len(neg), dtype=bool)]
    aucs = np.empty(resamples)
    for i in range(resamples):
        sample = np.r_[pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]]
        aucs[i] = roc_auc_binary(sample, labels)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    result.update(value=_round(value), low=_round(low), high=_round(high))
    return result


def roc_curve(scores: np.ndarray, positives: np.ndarray, max_points: int = ROC_CURVE_POINTS) -> dict[str, list]:
    """The ROC curve as plain data, for storing and drawing later.

    Args:
        scores: ``(n,)`` real scores, higher meaning "more positive".
        positives: ``(n,)`` booleans marking the positive samples.
        max_points: keep about this many points (evenly thinned, first and last kept).

    Returns:
        ``fpr``, ``tpr`` (rates 0..1 from (0, 0) to (1, 1)) and ``thresholds`` (the score at or
        above which a sample counts positive at that point; None for the (0, 0) start).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives).astype(bool)
    fpr, tpr = _roc_points(scores, positives)
    distinct = np.sort(np.unique(scores))[::-1]
    thresholds: list[float | None] = [None, *(_round(t) for t in distinct)]
    keep = np.arange(len(fpr))
    if len(keep) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
    return {
        "fpr": [_round(fpr[i]) for i in keep],
        "tpr": [_round(tpr[i]) for i in keep],
        "thresholds": [thresholds[i] for i in keep],
    }


def threshold_for_sensitivity(scores: np.ndarray, positives: np.ndarray, target: float) -> dict[str, Any]:
    """The highest score threshold at which the sensitivity reaches ``target``.

    A sample is called positive when its score is at or above the threshold. The threshold is
    one of the positives' scores: the lowest one among the top ``ceil(target * positives)``,
    so raising it any further would miss one positive too many.

    Args:
        scores: ``(n,)`` scores (e.g. the calibrated TUM probability, 0..1).
        positives: ``(n,)`` booleans marking the positive samples; the rest are negatives.
        target: required sensitivity in (0, 1].

    Returns:
        ``threshold``; ``sensitivity`` and ``specificity`` at it (each a ``proportion`` dict with
        its Wilson 95% interval; specificity's value is None without negatives);
        ``true_positives``, ``false_negatives``, ``true_negatives``, ``false_positives``.

    Raises:
        ValueError: no positive sample, or a target outside (0, 1].
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives).astype(bool)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target!r}")
    n_pos = int(positives.sum())
    if n_pos == 0:
        raise ValueError("no positive sample: a threshold for a sensitivity cannot be chosen")
    # The fewest positives that must be called: the tolerance keeps 0.98 * 100 from rounding up to 99.
    needed = max(1, math.ceil(target * n_pos - 1e-9))
    ranked = np.sort(scores[positives])[::-1]
    threshold = float(ranked[needed - 1])
    # Not rounded: a threshold rounded up past that positive's score would no longer call it.
    return {"threshold": threshold, **rates_at_threshold(scores, positives, threshold)}


def rates_at_threshold(scores: np.ndarray, positives: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity when ``score >= threshold`` calls a sample positive.

    Returns:
        ``sensitivity`` and ``specificity`` as ``proportion`` dicts (Wilson 95% intervals),
        and the four confusion counts.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives).astype(bool)
    called = scores >= threshold
    tp = int((called & positives).sum())
    fn = int((~called & positives).sum())
    tn = int((~called & ~positives).sum())
    fp = int((called & ~positives).sum())
    return {
        "sensitivity": proportion(tp, tp + fn),
        "specificity": proportion(tn, tn + fp),
        "true_positives": tp,
        "false_negatives": fn,
        "true_negatives": tn,
        "false_positives": fp,
    }


def restrict_to_classes(probabilities: np.ndarray, model_classes: Sequence[str], keep: Sequence[str]) -> np.ndarray:
    """Keep only some class columns and renormalise each row to sum to 1.

    Args:
        probabilities: ``(n, k)`` probabilities in ``model_classes`` order.
        model_classes: the k class names of the model, in column order.
        keep: the classes to keep (a subset of ``model_classes``).

    Returns:
        ``(n, len(keep))`` probabilities, columns in model order (not ``keep`` order); a row
        with no mass on the kept classes becomes uniform over them.

    Raises:
        ValueError: ``keep`` names a class the model does not have, or is empty.
    """
    model_classes = list(model_classes)
    unknown = sorted(set(keep) - set(model_classes))
    if unknown:
        raise ValueError(f"classes not in the model: {', '.join(unknown)}")
    if not keep:
        raise ValueError("keep must name at least one class")
    kept = set(keep)
    columns = [i for i, name in enumerate(model_classes) if name in kept]
    sub = np.asarray(probabilities, dtype=np.float64)[:, columns]
    mass = sub.sum(axis=1, keepdims=True)
    uniform = np.full_like(sub, 1.0 / len(columns))
    return np.where(mass > 0, sub / np.where(mass > 0, mass, 1.0), uniform)


def _label_indices(labels: Sequence[str] | np.ndarray, classes: Sequence[str]) -> np.ndarray:
    array = np.asarray(labels)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    position = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(label) for label in array.tolist()} - set(position))
    if unknown:
        raise ValueError(f"labels not among the classes: {', '.join(unknown)}")
    return np.array([position[str(label)] for label in array.tolist()], dtype=np.int64)


def evaluate(
    probabilities: np.ndarray, labels: Sequence[str] | np.ndarray, model_classes: Sequence[str]
) -> dict[str, Any]:
    """Score predicted probabilities against true class names.

    When the data hold only some of the model's classes (e.g. a 2-class test set for a
    9-class model), the probabilities are restricted to the classes present and renormalised,
    so the scores describe the task the data can test; the report says so.

    Args:
        probabilities: ``(n, k)`` probabilities in ``model_classes`` order, rows summing to 1.
        labels: ``n`` true class names.
        model_classes: the k class names of the model, in column order.

    Returns:
        JSON-serialisable dict (floats rounded to 6 decimals, metrics in [0, 1]):
        ``n``; ``classes`` (scored classes, model order); ``restricted_to`` (list or None);
        ``note`` (str or None); ``accuracy``; ``balanced_accuracy`` (mean recall);
        ``macro_precision`` / ``macro_recall`` / ``macro_f1``; ``per_class``
        {class: {precision, recall, f1, support}}; ``roc_auc`` {class: one-vs-rest AUC or None};
        ``macro_roc_auc`` (mean of the non-None AUCs; with exactly two scored classes, the AUC of
        the second class against the first; None when none is defined); ``confusion_matrix``
        (rows true, columns predicted, ``classes`` order); ``ece`` (top-label, 15 bins).

    Raises:
        ValueError: a label is not a model class, there are no samples, or shapes disagree.
    """
    model_classes = [str(name) for name in model_classes]
    label_names = [str(label) for label in np.asarray(labels).tolist()]
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not label_names:
        raise ValueError("no samples to evaluate")
    if probabilities.ndim != 2 or probabilities.shape != (len(label_names), len(model_classes)):
        raise ValueError(
            f"probabilities must have shape ({len(label_names)}, {len(model_classes)}), got {probabilities.shape}"
        )
    unknown = sorted(set(label_names) - set(model_classes))
    if unknown:
        raise ValueError(f"labels not among the model classes: {', '.join(unknown)}")

    present = set(label_names)
    if present == set(model_classes):
        classes = model_classes
        restricted_to = None
        note = None
    else:
        classes = [name for name in model_classes if name in present]
        probabilities = restrict_to_classes(probabilities, model_classes, classes)
        restricted_to = list(classes)
        note = f"scores restricted to the {len(classes)} classes present in the data and renormalised"

    k = len(classes)
    truth = _label_indices(label_names, classes)
    predicted = probabilities.argmax(axis=1)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)

    per_class: dict[str, dict[str, float | int]] = {}
    precisions, recalls, f1s = [], [], []
    for i, name in enumerate(classes):
        support = int(matrix[i].sum())
        predicted_count = int(matrix[:, i].sum())
        true_positive = int(matrix[i, i])
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": _round(precision),
            "recall": _round(recall),
            "f1": _round(f1),
            "support": support,
        }
        # Every scored class is present after restriction; the guard keeps macro means honest anyway.
        if support:
            precisions.append(precision)
            recalls.append(recall)
            f1s.append(f1)

    roc_auc: dict[str, float | None] = {}
    for i, name in enumerate(classes):
        auc = roc_auc_binary(probabilities[:, i], truth == i)
        roc_auc[name] = None if auc is None else _round(auc)
    defined = [auc for auc in roc_auc.values() if auc is not None]
    if k == 2:
        # Binary convention: the second class is "positive"; computed directly rather than
        # averaged so floating-point near-ties cannot make the two columns disagree.
        macro_roc_auc = roc_auc[classes[1]]
    else:
        macro_roc_auc = _round(np.mean(defined)) if defined else None

    return {
        "n": len(label_names),
        "classes": list(classes),
        "restricted_to": restricted_to,
        "note": note,
        "accuracy": _round(np.trace(matrix) / len(label_names)),
        "balanced_accuracy": _round(np.mean(recalls)),
        "macro_precision": _round(np.mean(precisions)),
        "macro_recall": _round(np.mean(recalls)),
        "macro_f1": _round(np.mean(f1s)),
        "per_class": per_class,
        "roc_auc": roc_auc,
        "macro_roc_auc": macro_roc_auc,
        "confusion_matrix": matrix.tolist(),
        "ece": _round(expected_calibration_error(probabilities, truth, bins=ECE_BINS)),
    }


def _axes(width: float, height: float):
    """A figure and its axes, drawn off-screen. Uses matplotlib's Figure directly (not pyplot), so
    it neither switches the process-wide backend nor keeps figures alive in pyplot's registry."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def save_confusion_matrix(path: str | Path, report: dict[str, Any]) -> Path:
    """Write the report's confusion matrix as a PNG heat map (colour = row-normalised rate, text = count).

    Args:
        path: output PNG file; parent directories are created.
        report: a dict returned by ``evaluate``.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = report["classes"]
    matrix = np.asarray(report["confusion_matrix"], dtype=np.float64)
    # Colour by recall-style row rates so rare classes are as visible as common ones.
    rows = matrix.sum(axis=1, keepdims=True)
    rates = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = max(4.0, 0.6 * len(classes) + 2.5)
    fig, ax = _axes(size, size)
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour, fontsize=8)
    ax.set_title(f"Confusion matrix (n = {report['n']}, accuracy {report['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def _roc_points(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # One point per distinct threshold, so tied scores give a diagonal segment (consistent with
    # the average-rank AUC).
    order = np.argsort(-scores, kind="mergesort")
    scores, positives = scores[order], positives[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(positives)[last_of_threshold]
    false_pos = (last_of_threshold + 1) - true_pos
    tpr = np.r_[0.0, true_pos / max(positives.sum(), 1)]
    fpr = np.r_[0.0, false_pos / max((~positives).sum(), 1)]
    return fpr, tpr


def save_roc_curves(
    path: str | Path, probabilities: np.ndarray, labels: Sequence[str] | np.ndarray, classes: Sequence[str]
) -> Path:
    """Write one-vs-rest ROC curves, one per class with both positives and negatives, as a PNG.

    Args:
        path: output PNG file; parent directories are created.
        probabilities: ``(n, k)`` probabilities in ``classes`` order.
        labels: ``n`` true class names (or integer column indices).
        classes: the k class names, in column order.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = _label_indices(labels, classes)
    fig, ax = _axes(6, 6)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for i, name in enumerate(classes):
        positives = truth == i
        auc = roc_auc_binary(probabilities[:, i], positives)
        if auc is None:
            continue
        fpr, tpr = _roc_points(probabilities[:, i], positives)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curves (one vs rest)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def save_reliability_diagram(
    path: str | Path,
    probabilities: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    bins: int = ECE_BINS,
    *,
    classes: Sequence[str] | None = None,
) -> Path:
    """Write a reliability diagram: per-bin accuracy against top-label confidence, with the diagonal.

    Args:
        path: output PNG file; parent directories are created.
        probabilities: ``(n, k)`` probabilities, rows summing to 1.
        labels: ``n`` integer true-class column indices, or class names when ``classes`` is given.
        bins: number of equal-width confidence bins on (0, 1].
        classes: the k class names in column order, needed only for string labels.

    Returns:
        The written path. The title carries the ECE computed with the same bins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if classes is not None:
        truth = _label_indices(labels, classes)
    else:
        truth = np.asarray(labels, dtype=np.int64)
    confidences = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == truth).astype(np.float64)
    index = _confidence_bins(confidences, bins)
    counts = np.bincount(index, minlength=bins)
    accuracy = np.divide(
        np.bincount(index, weights=correct, minlength=bins), counts, out=np.zeros(bins), where=counts > 0
    )
    mean_conf = np.divide(
        np.bincount(index, weights=confidences, minlength=bins), counts, out=np.zeros(bins), where=counts > 0
    )
    ece = expected_calibration_error(probabilities, truth, bins=bins)
    width = 1.0 / bins
    lefts = np.arange(bins) * width
    filled = counts > 0
    fig, ax = _axes(6, 6)
    ax.bar(lefts[filled], accuracy[filled], width=width, align="edge", edgecolor="black", label="accuracy")
    ax.bar(
        lefts[filled],
        mean_conf[filled] - accuracy[filled],
        bottom=accuracy[filled],
        width=width,
        align="edge",
        color="red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE {ece:.4f}, {bins} bins, n = {len(truth)})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def save_plots(
    directory: str | Path, probabilities: np.ndarray, labels: Sequence[str] | np.ndarray, report: dict[str, Any]
) -> list[Path]:
    """Write ``confusion_matrix.png``, ``roc.png`` and ``reliability.png`` for a report.

    Args:
        directory: output folder; created when missing.
        probabilities: ``(n, len(report["classes"]))`` scored (already restricted) probabilities.
        labels: ``n`` true class names, each in ``report["classes"]``.
        report: the dict returned by ``evaluate`` for these data.

    Returns:
        The three written paths, in the order above.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    classes = report["classes"]
    return [
        save_confusion_matrix(directory / "confusion_matrix.png", report),
        save_roc_curves(directory / "roc.png", probabilities, labels, classes),
        save_reliability_diagram(directory / "reliability.png", probabilities, labels, ECE_BINS, classes=classes),
    ]


def _png(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def roc_png(curve: dict[str, list], *, auc: float | None = None, point: tuple[float, float] | None = None) -> bytes:
    """Draw a stored ROC curve (from ``roc_curve``) as PNG bytes, with the operating point marked.

    Args:
        curve: ``{"fpr": [...], "tpr": [...]}``, rates 0..1.
        auc: the area to print in the legend, if known.
        point: the operating point as (false positive rate, true positive rate), if any.
    """
    fig, ax = _axes(4.5, 4.5)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    label = "ROC" if auc is None else f"ROC (AUC {auc:.3f})"
    ax.plot(curve["fpr"], curve["tpr"], linewidth=1.5, drawstyle="default", label=label)
    if point is not None:
        ax.plot([point[0]], [point[1]], marker="o", color="#7a1f5c", linestyle="none", label="operating point")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def reliability_png(bins: list[dict[str, Any]], *, ece: float | None = None) -> bytes:
    """Draw stored reliability bins (from ``reliability_bins``) as a reliability diagram, PNG bytes."""
    filled = [b for b in bins if b["count"]]
    fig, ax = _axes(4.5, 4.5)
    lefts = [b["lower"] for b in filled]
    widths = [b["upper"] - b["lower"] for b in filled]
    accuracy = [b["accuracy"] for b in filled]
    gaps = [b["confidence"] - b["accuracy"] for b in filled]
    ax.bar(lefts, accuracy, width=widths, align="edge", edgecolor="black", label="accuracy")
    ax.bar(lefts, gaps, bottom=accuracy, width=widths, align="edge", color="red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    n = sum(b["count"] for b in bins)
    ax.set_title(f"n = {n}" + ("" if ece is None else f", ECE {ece:.4f}"), fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)
