"""The human-readable model card written beside every model version."""

from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _operating_point(point: dict | None) -> str:
    if not point:
        return (
            "No default threshold of its own: 'suspected tumour' means TUM probability >= 0.5 until a site "
            "validates the model (`validate_site`) and sets its own."
        )
    return (
        f"Default 'suspected tumour' threshold TUM probability >= {point['threshold']:.4f}, for sites that have not "
        f"validated the model yet: on {point['images']} tiles from {point['fitted_on']}, it reaches tumour "
        f"sensitivity {_pct(point.get('sensitivity'))} (target {_pct(point.get('target_sensitivity'))}) at "
        f"specificity {_pct(point.get('specificity'))}. A site's own validation (`validate_site`) replaces it."
    )


def _generalisation(pooled: dict | None, baseline: dict | None) -> list[str]:
    """NORM-vs-TUM figures pooled over the held-out sources and the simulated other labs."""
    if not pooled:
        return []
    lines = [
        "",
        "### NORM vs TUM on unseen sources and simulated other labs",
        "",
        "Pooled over every held-out source above, and over the same held-out tiles as four simulated other labs "
        "deliver them (`inference/core/otherlab.py`: stain, 0.25-0.8 µm/px, focus, JPEG 30-80). NORM-vs-TUM "
        "readout, tumour called at 0.5.",
        "",
        "| model | protocol | images | accuracy | tumour sensitivity | specificity | ROC AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, figures in (("this version", pooled), ("baseline: " + str((baseline or {}).get("label")), baseline)):
        for protocol in ("held_out_sources", "simulated_other_labs"):
            f = (figures or {}).get(protocol)
            if f:
                lines.append(
                    f"| {label} | {protocol.replace('_', ' ')} | {f['images']} | {_pct(f.get('accuracy'))} | "
                    f"{_pct(f.get('sensitivity'))} | {_pct(f.get('specificity'))} | {f.get('roc_auc', 'n/a')} |"
                )
    return lines


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
            "| held-out source | images | accuracy | NORM-vs-TUM accuracy (NORM/TUM images) "
            "| as simulated other labs: accuracy / tumour sensitivity (images) |",
            "|---|---|---|---|---|",
        ]
        for source, row in lodo.items():
            simulated = row.get("simulated_other_lab") or {}
            lines.append(
                f"| {source} | {row['images']} | {_pct(row.get('accuracy'))} | "
                f"{_pct(row.get('norm_vs_tum_accuracy'))} ({row.get('norm_vs_tum_images', 0)}) | "
                f"{_pct(simulated.get('accuracy'))} / {_pct(simulated.get('sensitivity'))} "
                f"({simulated.get('images', 0)}) |"
            )
    lines += _generalisation(training.get("generalisation"), training.get("generalisation_baseline"))
    lineage = training.get("lineage")
    if lineage:
        versions = ", ".join(f"{s} {v[:16]}..." for s, v in lineage.get("dataset_versions", {}).items())
        lines += [
            "",
            "## Lineage",
            "",
            f"Fine-tuned from {lineage.get('parent')} (model.keras sha256 {str(lineage.get('parent_sha256'))[:16]}...) "
            f"on dataset version(s) {versions}; "
            f"{len(lineage.get('trained_on_sha256', []))} reviewed patches were in its training data and are left "
            "out of its shadow evaluation.",
        ]
    lines += [
        "",
        "## Operating point",
        "",
        _operating_point(metadata.get("operating_point")),
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
        "- Patches are resized to the input size whatever their scale; other magnifications (0.25-1.0 µm/px) are "
        "covered by training views at those scales, not by resampling at serving.",
        "- Measure it on each site's own tissue before trusting it there (`manage.py validate_site`): the "
        "figures above come from four small public sources and simulated shifts, not from your lab.",
        "- Blank, background, blurred and non-H&E inputs are meant to be stopped by the platform's quality check "
        "before they reach the model.",
        "",
    ]
    return "\n".join(lines)
