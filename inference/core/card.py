"""The human-readable model card written beside every model version."""

from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def model_card(metadata: dict[str, Any]) -> str:
    """Markdown model card from a model's metadata.json content."""
    training = metadata.get("training", {})
    test = (metadata.get("metrics") or {}).get("test") or {}
    calibration = metadata.get("calibration") or {}
    lines = [
        f"# Model card: {metadata['name']} v{metadata['version']}",
        "",
        "**Intended use:** decision support for colorectal H&E patch triage; every result is reviewed by a "
        "pathologist. Not a diagnostic device.",
        "",
        f"- Classes: {', '.join(metadata['classes'])}",
        f"- Input: {metadata['input_size']} px RGB, preprocessing `{metadata['preprocessing']}`, "
        f"trained for {metadata.get('um_per_px')} µm/px",
        f"- Architecture: {metadata.get('architecture', 'n/a')}",
        f"- Weights: {training.get('weights')} (sha256 {str(training.get('weights_sha256'))[:16]}...)",
        f"- Training data manifest sha256: {training.get('data_manifest_sha256')}",
        "",
        "## Training data",
        "",
        "| source | µm/px | images per class |",
        "|---|---|---|",
    ]
    for source, info in (training.get("sources") or {}).items():
        counts = ", ".join(f"{c} {n}" for c, n in info.get("images", {}).items())
        lines.append(f"| {source} | {info.get('um_per_px')} | {counts} |")
    split = training.get("split", {})
    lines += [
        "",
        f"Split by slide / near-duplicate group: {split.get('train')} train, {split.get('validation')} validation, "
        f"{split.get('test')} test images. Augmentation: {training.get('augmentation', 'n/a')}.",
        "",
        "## Test metrics (held-out split)",
        "",
    ]
    if test:
        lines += [
            f"- Accuracy {_pct(test.get('accuracy'))}, balanced accuracy {_pct(test.get('balanced_accuracy'))}, "
            f"macro F1 {test.get('macro_f1')}, macro ROC AUC {test.get('macro_roc_auc')}",
            f"- Expected calibration error {test.get('ece')} "
            f"(before temperature scaling {test.get('ece_uncalibrated')})",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for name, row in test.get("per_class", {}).items():
            lines.append(f"| {name} | {row['precision']} | {row['recall']} | {row['f1']} | {row['support']} |")
    else:
        lines.append("No test split (too little data).")
    lodo = training.get("leave_one_dataset_out")
    if lodo:
        lines += [
            "",
            "## Generalisation across labs: leave one dataset out",
            "",
            "Trained on the other sources, tested on the held-out one (scores restricted to the classes present).",
            "",
            "| held-out source | images | accuracy | NORM-vs-TUM accuracy (NORM/TUM images) |",
            "|---|---|---|---|",
        ]
        for source, row in lodo.items():
            lines.append(
                f"| {source} | {row['images']} | {_pct(row.get('accuracy'))} | "
                f"{_pct(row.get('norm_vs_tum_accuracy'))} ({row.get('norm_vs_tum_images', 0)}) |"
            )
    lines += [
        "",
        "## Calibration and uncertainty",
        "",
        f"Temperature {calibration.get('temperature')} fitted on the {calibration.get('fitted_on')} split "
        f"(ECE {calibration.get('ece_before')} -> {calibration.get('ece_after')}). A prediction whose top "
        f"probability is below {calibration.get('attention_threshold')} is flagged *needs attention*.",
        "",
        "## Limitations",
        "",
        "- Trained on small public samples unless stated otherwise above; figures on so few images are estimates "
        "with wide uncertainty.",
        "- Patches are resized to the input size whatever their scale; other magnifications are covered only by "
        "scale augmentation.",
        "- Blank, background, blurred and non-H&E inputs are meant to be stopped by the platform's quality check "
        "before they reach the model.",
        "",
    ]
    return "\n".join(lines)
