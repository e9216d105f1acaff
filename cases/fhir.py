"""HL7 FHIR R4 representation of a case: a Bundle with the Patient, the Specimen, one Observation
per analysed patch and a DiagnosticReport.

Codes: LOINC 11526-1 "Pathology study" for the report; SNOMED CT for tissue classes where one
exists (35917007 adenocarcinoma for TUM); our own code system for the rest and for the AI
observation itself. Until a pathologist signs the case out (the review issue), the report and
its observations are ``preliminary``: only the AI has spoken.
"""

from __future__ import annotations

import uuid

from cases.models import BiopsyCase, Patient, TissuePatch

SYSTEM = "https://cloudiopsy.invalid/fhir"
TISSUE_CLASSES = f"{SYSTEM}/CodeSystem/tissue-class"
CLASS_NAMES = {
    "ADI": "Adipose tissue",
    "BACK": "Background",
    "DEB": "Debris",
    "LYM": "Lymphocytes",
    "MUC": "Mucus",
    "MUS": "Smooth muscle",
    "NORM": "Normal colon mucosa",
    "STR": "Cancer-associated stroma",
    "TUM": "Colorectal adenocarcinoma epithelium",
}
SNOMED = {"TUM": ("35917007", "Adenocarcinoma, no subtype")}
OBSERVATION_CODES = f"{SYSTEM}/CodeSystem/observation"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
VALIDATED_AT_SITE = f"{SYSTEM}/StructureDefinition/validated-at-site"
PROBABILITY_UNIT = {"unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"}
GENDER = {Patient.Sex.FEMALE: "female", Patient.Sex.MALE: "male", Patient.Sex.OTHER: "other"}


def _urn(kind: str, pk: int, institution_id: int) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{SYSTEM}/{institution_id}/{kind}/{pk}"))


def _number(value: float) -> str:
    """A probability in text, to 6 significant digits, so that a score close to a threshold reads apart from it."""
    return f"{float(value):.6g}"


def _tissue_concept(label: str) -> dict:
    codings = [{"system": TISSUE_CLASSES, "code": label, "display": CLASS_NAMES.get(label, label)}]
    if label in SNOMED:
        code, display = SNOMED[label]
        codings.append({"system": "http://snomed.info/sct", "code": code, "display": display})
    return {"coding": codings, "text": CLASS_NAMES.get(label, label)}


def _observation(patch: TissuePatch, prediction, refs: dict) -> dict:
    components = [
        {
            "code": {"coding": [{"system": TISSUE_CLASSES, "code": name}], "text": f"Probability of {name}"},
            "valueQuantity": {"value": round(float(p), 6), **PROBABILITY_UNIT},
        }
        for name, p in prediction.scores.items()
    ]
    if prediction.uncertainty is not None:
        components.append(
            {
                "code": {"coding": [{"system": OBSERVATION_CODES, "code": "uncertainty"}]},
                "valueQuantity": {
                    "value": round(float(prediction.uncertainty), 6),
                    "unit": "1",
                    "system": "http://unitsofmeasure.org",
                    "code": "1",
                },
            }
        )
    notes = [{"text": f"Patch {patch.original_name} ({patch.width}x{patch.height} px, sha256 {patch.sha256})"}]
    interpretation = []
    if prediction.tumour_threshold is not None:
        components.append(
            {
                "code": {
                    "coding": [{"system": OBSERVATION_CODES, "code": "tumour-threshold"}],
                    "text": "TUM-probability threshold (operating point) the result was judged by",
                },
                "valueQuantity": {"value": round(float(prediction.tumour_threshold), 6), **PROBABILITY_UNIT},
            }
        )
    if prediction.suspected_tumour is not None:
        suspected = prediction.suspected_tumour
        components.append(
            {
                "code": {
                    "coding": [{"system": OBSERVATION_CODES, "code": "suspected-tumour"}],
                    "text": "Suspected tumour: TUM probability at or above the threshold",
                },
                "valueBoolean": suspected,
            }
        )
        interpretation.append(
            {
                "coding": [
                    {"system": INTERPRETATION, "code": "POS" if suspected else "NEG"},
                    {"system": OBSERVATION_CODES, "code": "suspected-tumour" if suspected else "not-suspected-tumour"},
                ],
                "text": (
                    f"{'Suspected tumour' if suspected else 'Not suspected of tumour'}: TUM probability "
                    f"{_number(prediction.scores['TUM'])} {'at or above' if suspected else 'below'} "
                    f"{'this site' if prediction.validated_at_site else 'the model'}'s threshold "
                    f"{_number(prediction.tumour_threshold)}"
                ),
            }
        )
    validation = prediction.site_validation
    if validation is not None:
        notes.append(
            {
                "text": f"Judged by this site's threshold {_number(validation.threshold)}, from the site validation "
                f"of {validation.created_at:%Y-%m-%d} (tumour sensitivity {validation.sensitivity:.1%}, "
                f"specificity {validation.specificity:.1%})."
            }
        )
    else:
        notes.append(
            {
                "text": "Not validated at this site: this model version has no passing validation on the "
                "institution's own tissue"
                + (
                    f"; the model's default threshold {_number(prediction.tumour_threshold)} applied."
                    if prediction.tumour_threshold is not None
                    else "."
                )
            }
        )
    observation = {
        "resourceType": "Observation",
        "id": f"patch-{patch.pk}",
        "extension": [{"url": VALIDATED_AT_SITE, "valueBoolean": prediction.validated_at_site}],
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}
        ],
        "code": {
            "coding": [{"system": f"{SYSTEM}/CodeSystem/observation", "code": "ai-tissue-class"}],
            "text": "AI tissue classification of an H&E patch",
        },
        "subject": {"reference": refs["patient"]},
        "specimen": {"reference": refs["specimen"]},
        "issued": prediction.created_at.isoformat(),
        "valueCodeableConcept": _tissue_concept(prediction.label),
        "method": {
            "text": f"{prediction.model_version} (needs attention: {'yes' if prediction.needs_attention else 'no'})"
        },
        "note": notes,
        "component": components,
    }
    if interpretation:
        observation["interpretation"] = interpretation
    return observation


def _slides(case: BiopsyCase) -> list:
    from slides.models import Slide

    return list(
        Slide.objects.filter(case=case).select_related("model_version").prefetch_related("regions").order_by("id")
    )


def _slide_observation(slide, refs: dict) -> dict:
    """A whole-slide image's AI result: tumour area fraction at the site's operating point, whether
    tumour is suspected, and its most suspicious regions, each a patch of the case whose own
    Observation (and review) the bundle holds once it is analysed."""
    validated = slide.site_validation_id is not None
    unit = {"unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}
    components = [
        {
            "code": {"coding": [{"system": OBSERVATION_CODES, "code": "tumour-threshold"}]},
            "valueQuantity": {"value": round(float(slide.tumour_threshold or 0), 6), **PROBABILITY_UNIT},
        },
        {
            "code": {"coding": [{"system": OBSERVATION_CODES, "code": "suspected-tumour"}]},
            "valueBoolean": bool(slide.suspected_tumour),
        },
        {
            "code": {
                "coding": [{"system": OBSERVATION_CODES, "code": "tiles-analysed"}],
                "text": "Tissue tiles analysed",
            },
            "valueQuantity": {"value": slide.tiles_done, **unit},
        },
        {
            "code": {"coding": [{"system": OBSERVATION_CODES, "code": "tiles-total"}], "text": "Tissue tiles"},
            "valueQuantity": {"value": slide.tiles_total, **unit},
        },
    ]
    regions = sorted(slide.regions.all(), key=lambda r: r.rank)
    for region in regions:
        components.append(
            {
                "code": {
                    "coding": [{"system": OBSERVATION_CODES, "code": "suspicious-region"}],
                    "text": f"Region {region.rank}: level-0 pixels x {region.x}, y {region.y}, "
                    f"{region.width} x {region.height}" + (f"; patch {region.patch_id}" if region.patch_id else ""),
                },
                "valueQuantity": {"value": round(float(region.score), 6), **PROBABILITY_UNIT},
            }
        )
    suspected = bool(slide.suspected_tumour)
    return {
        "resourceType": "Observation",
        "id": f"slide-{slide.pk}",
        "extension": [{"url": VALIDATED_AT_SITE, "valueBoolean": validated}],
        "status": "preliminary",
        "code": {
            "coding": [{"system": f"{SYSTEM}/CodeSystem/observation", "code": "ai-slide-tumour-fraction"}],
            "text": "AI tumour area fraction of a whole-slide image",
        },
        "subject": {"reference": refs["patient"]},
        "specimen": {"reference": refs["specimen"]},
        "issued": slide.finished_at.isoformat() if slide.finished_at else None,
        "valueQuantity": {"value": round(float(slide.tumour_fraction or 0), 6), **unit},
        "interpretation": [
            {
                "coding": [{"system": INTERPRETATION, "code": "POS" if suspected else "NEG"}],
                "text": f"{'Suspected tumour' if suspected else 'Not suspected of tumour'} on the slide at the "
                f"{'site' if validated else 'model'}'s threshold {_number(slide.tumour_threshold or 0)}",
            }
        ],
        "method": {"text": str(slide.model_version)},
        "note": [
            {
                "text": f"Slide {slide.original_name} ({slide.width} x {slide.height} px at {slide.mpp:g} µm/px, "
                f"sha256 {slide.sha256}); {len(regions)} most suspicious regions are patches of this case for review."
            }
        ],
        "component": components,
    }


def case_bundle(case: BiopsyCase) -> dict:
    """The case as a FHIR R4 ``collection`` Bundle (a plain dict, ready for JSON)."""
    patient, inst = case.patient, case.institution_id
    refs = {"patient": _urn("patient", patient.pk, inst), "specimen": _urn("specimen", case.pk, inst)}
    patient_resource = {
        "resourceType": "Patient",
        "id": f"patient-{patient.pk}",
        "identifier": [{"system": f"{SYSTEM}/institution/{case.institution.slug}/mrn", "value": patient.mrn}],
        "name": [{"text": patient.name}] if patient.name else [],
        "gender": GENDER.get(patient.sex, "unknown"),
        **({"birthDate": patient.birth_date.isoformat()} if patient.birth_date else {}),
    }
    specimen = {
        "resourceType": "Specimen",
        "id": f"specimen-{case.pk}",
        "accessionIdentifier": {
            "system": f"{SYSTEM}/institution/{case.institution.slug}/accession",
            "value": case.accession,
        },
        "status": "available",
        "type": {"coding": [{"system": "http://snomed.info/sct", "code": "122638001", "display": "Biopsy specimen"}]},
        "subject": {"reference": refs["patient"]},
        "receivedTime": case.created_at.isoformat(),
        "collection": {"bodySite": {"text": case.specimen_site}},
    }
    entries = [(refs["patient"], patient_resource), (refs["specimen"], specimen)]
    results, labels, suspected, not_validated = [], [], 0, 0
    for patch in case.patches.all():
        prediction = next(iter(patch.predictions.all()), None)
        if prediction is None:
            continue
        ref = _urn("observation", prediction.pk, inst)
        observation = _observation(patch, prediction, refs)
        review = max(patch.reviews.all(), key=lambda r: r.pk, default=None)
        if review is not None:
            # The pathologist's class is the result; the AI's stays alongside as a component.
            observation["status"] = "final"
            observation["component"].append(
                {
                    "code": {"coding": [{"system": f"{SYSTEM}/CodeSystem/observation", "code": "ai-tissue-class"}]},
                    "valueCodeableConcept": _tissue_concept(prediction.label),
                }
            )
            observation["valueCodeableConcept"] = _tissue_concept(review.final_label)
            observation["performer"] = [{"display": review.pathologist.get_username()}]
        entries.append((ref, observation))
        results.append({"reference": ref})
        labels.append(prediction.label)
        suspected += prediction.suspected_tumour is True
        not_validated += not prediction.validated_at_site
    slides_pending = 0
    for slide in _slides(case):
        if slide.status != "done":
            slides_pending += slide.status != "failed"
            continue
        ref = _urn("slide-observation", slide.pk, inst)
        entries.append((ref, _slide_observation(slide, refs)))
        results.append({"reference": ref})
    patches_pending = sum(p.status in TissuePatch.PENDING for p in case.patches.all())
    pending = patches_pending + slides_pending
    tumour = labels.count("TUM")
    sign_out = getattr(case, "sign_out", None)
    addenda = list(case.addenda.all())
    if sign_out is not None:
        status = "amended" if addenda else "final"
        conclusion = f"{sign_out.get_conclusion_display()} (tumour patch fraction {sign_out.tumour_fraction:.0%})."
        if sign_out.comment:
            conclusion += f" {sign_out.comment}"
        for number, addendum in enumerate(addenda, 1):
            conclusion += f" Addendum {number} ({addendum.reason}): {addendum.text}"
    else:
        status = "preliminary" if not pending else "partial"
        conclusion = (
            f"AI analysis (not yet reviewed by a pathologist): {tumour} of {len(labels)} analysed patches classified "
            f"as adenocarcinoma epithelium (TUM); {suspected} suspected of tumour (TUM probability at or above "
            f"the operating point)"
            + (f"; {patches_pending} patches still being analysed" if patches_pending else "")
            + (f"; {slides_pending} slides still being analysed" if slides_pending else "")
            + "."
        )
        if not_validated:
            conclusion += (
                f" {not_validated} of {len(labels)} results are not validated at this site: "
                "the model's default threshold applied."
            )
    report = {
        "resourceType": "DiagnosticReport",
        "id": f"report-{case.pk}",
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "SP",
                        "display": "Surgical Pathology",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "11526-1", "display": "Pathology study"}]},
        "subject": {"reference": refs["patient"]},
        "specimen": [{"reference": refs["specimen"]}],
        "issued": case.updated_at.isoformat(),
        "result": results,
        "conclusion": conclusion,
    }
    entries.append((_urn("report", case.pk, inst), report))
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": case.updated_at.isoformat(),
        "entry": [{"fullUrl": url, "resource": resource} for url, resource in entries],
    }
