"""Drift monitoring, on real patches through the real path: upload, analysis by the demo model,
a site validation of the same kind of tissue as the baseline, then check_drift and the admin page."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import RequestFactory
from PIL import Image, ImageFilter, ImageOps

from accounts.models import User
from audit.models import AuditEvent
from cases.models import TissuePatch
from cases.review import review_submit
from cases.services import patch_upload
from inference import drift, services
from inference.context_processors import drift_alert
from inference.core.augment import HED_FROM_RGB, RGB_FROM_HED
from inference.models import SiteValidation
from inference.sites import SiteImage, site_images_from_folder, site_validate
from tests.conftest import FIXTURE_PATCHES, make_user, new_case, shared_data, verified_login

pytestmark = pytest.mark.django_db

FIXTURES = sorted(p for p in FIXTURE_PATCHES.rglob("*") if p.suffix in {".png", ".tif"})


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def restain(image: Image.Image, haematoxylin: float = 1.8) -> Image.Image:
    """The same tissue stained more strongly with haematoxylin: its optical density scaled (HED space)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    hed = -np.log(np.maximum(pixels / 255.0, 1e-6)).reshape(-1, 3) @ HED_FROM_RGB
    hed[:, 0] *= haematoxylin
    rgb = np.exp(-np.maximum(hed @ RGB_FROM_HED, 0.0)) * 255.0
    return Image.fromarray(np.clip(rgb, 0, 255).reshape(pixels.shape).astype(np.uint8))


def tiles(*transforms, paths=FIXTURES) -> list[tuple[str, str, bytes]]:
    """(class, name, PNG bytes) of every real tile under each transform: flips and rotations of
    the same tissue for volume, or a shift."""
    return [
        (path.parent.name, f"{index}-{path.stem}.png", png(transform(Image.open(path).convert("RGB"))))
        for index, transform in enumerate(transforms)
        for path in paths
    ]


SAME_TISSUE = (ImageOps.mirror, lambda im: im.rotate(270))  # not the baseline's own pixels


def validate(institution, version, images) -> SiteValidation:
    return site_validate(
        institution=institution,
        model_version=version,
        images=[SiteImage(label=label, name=name, data=data) for label, name, data in images],
        data_source="tests",
        min_per_class=1,
        actor="test",
    )


def analyse(user, images, accession: str) -> list[TissuePatch]:
    case = new_case(user, accession=accession, mrn=f"M-{accession}")
    patches = patch_upload(case=case, uploaded_by=user, files=[(name, data) for _, name, data in images]).patches
    services.prediction_run(patch_ids=[p.pk for p in patches])
    return [TissuePatch.objects.get(pk=p.pk) for p in patches]


def check_drift(*args: str) -> tuple[int, str]:
    """(exit status, output) of manage.py check_drift."""
    out = io.StringIO()
    try:
        call_command("check_drift", *args, stdout=out, stderr=io.StringIO())
    except CommandError as exc:
        return exc.returncode, f"{out.getvalue()}\n{exc}"
    return 0, out.getvalue()


def drift_events():
    return list(AuditEvent.objects.filter(action="drift.detected"))


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()  # the banner's cache lives in the process, across tests
    yield
    cache.clear()


@pytest.fixture
def site(institution, demo_model, settings):
    """The institution's baseline: the demo model validated on the real tiles and their 90-degree turns."""
    settings.SITE_VALIDATION_MIN_PER_CLASS = 1
    validation = validate(institution, demo_model, tiles(lambda im: im, lambda im: im.rotate(90)))
    assert validation.passed and validation.metrics["baseline"]["n"] == 2 * len(FIXTURES)
    return validation


def test_unshifted_patches_are_quiet(site, clinician, institution):
    analyse(clinician, tiles(*SAME_TISSUE), "S-SAME")
    status, out = check_drift("--institution", institution.slug, "--min-patches", "5", "-v", "2")
    assert status == 0, out
    assert "no drift" in out and "Haematoxylin OD (mean)" in out  # -v 2 lists every judged figure
    assert drift_events() == []
    current = drift.drift_report(institution=institution, min_patches=5).weeks[-1]
    figures = {f.key: f for f in current.figures}
    assert figures["od_h"].status == drift.OK and figures["od_h"].n == 2 * len(FIXTURES)
    assert figures["qc_rejection_rate"].value == 0.0 and figures["qc_rejection_rate"].status == drift.OK
    assert figures["agreement"].status == drift.TOO_FEW  # nobody has reviewed yet


def test_restained_patches_drift_on_haematoxylin(site, clinician, institution):
    analyse(clinician, tiles(*(lambda im, t=t: restain(t(im)) for t in SAME_TISSUE)), "S-STAIN")
    status, out = check_drift("--institution", institution.slug, "--min-patches", "5")
    assert status == 1, out
    assert "Haematoxylin OD (mean)" in out and "drift detected at stmarys" in out
    (event,) = drift_events()
    assert event.institution_id == institution.pk and event.actor_type == AuditEvent.ActorType.SYSTEM
    drifted = {f["key"]: f for f in event.after["figures"]}
    od_h = drifted["od_h"]
    assert od_h["value"] > od_h["high"] > od_h["baseline"] == site.metrics["baseline"]["od_h"]["mean"]
    assert "od_e" not in drifted  # eosin was left alone


@pytest.mark.parametrize("radius", [1.5, 3])
def test_blurred_patches_drift_on_focus(site, clinician, institution, radius):
    blurred = tiles(*(lambda im, t=t: t(im).filter(ImageFilter.GaussianBlur(radius)) for t in SAME_TISSUE))
    patches = analyse(clinician, blurred, "S-BLUR")
    rejected = [p for p in patches if p.status == TissuePatch.Status.UNASSESSABLE]
    assert all(p.failure_code == "out_of_focus" for p in rejected)
    status, out = check_drift("--institution", institution.slug, "--min-patches", "5")
    assert status == 1, out
    (event,) = drift_events()
    keys = {f["key"] for f in event.after["figures"]}
    # Mild blur passes the quality check less sharp; strong blur is rejected as out of focus.
    assert keys & {"sharpness", "qc_rejection_rate", "qc_rejections.out_of_focus"}, keys
    if len(rejected) == len(patches):
        assert {"qc_rejection_rate", "qc_rejections.out_of_focus"} <= keys


def test_pathologists_overriding_the_ai_drifts_agreement(site, clinician, institution):
    patches = analyse(clinician, tiles(*SAME_TISSUE), "S-REVIEW")
    reader = make_user(institution, User.Role.PATHOLOGIST, username="reader")
    for patch in patches:
        ai = patch.predictions.get().label
        review_submit(
            patch=patch,
            pathologist=reader,
            decision="override",
            final_label="STR" if ai != "STR" else "MUS",
            reason_code="wrong_class",
        )
    status, out = check_drift("--institution", institution.slug, "--min-patches", "5")
    assert status == 1, out
    assert "Agreement with pathologists" in out
    (event,) = drift_events()
    assert [f["key"] for f in event.after["figures"]] == ["agreement"]
    assert event.after["figures"][0]["value"] == 0.0


def test_week_with_too_few_patches_is_not_judged(site, clinician, institution, settings):
    analyse(clinician, tiles(restain), "S-FEW")  # 7 patches, default minimum 20
    status, out = check_drift("--institution", institution.slug)
    assert status == 0, out
    assert "no drift" in out and "too few" in out
    assert drift_events() == []
    settings.DRIFT_MIN_PATCHES = 5
    assert check_drift("--institution", institution.slug)[0] == 1


def test_institution_without_baseline_exits_zero_and_says_so(institution, demo_model, clinician, settings):
    analyse(clinician, tiles(restain), "S-NOBASE")
    status, out = check_drift("--min-patches", "5")
    assert status == 0, out
    assert "no baseline" in out and "nothing judged" in out
    assert drift_events() == []


def test_failing_validation_is_used_until_one_passes(site, institution, demo_model):
    failing = SiteValidation.objects.get(pk=site.pk)
    failing.pk, failing.passed = None, False
    failing.save()  # newer, but not passing: the passing one applies
    assert drift.drift_baseline(institution_id=institution.pk, model_version=demo_model) == site
    SiteValidation.objects.filter(pk=site.pk).update(passed=False)
    assert drift.drift_baseline(institution_id=institution.pk, model_version=demo_model) == failing


def test_usage_errors_exit_two(institution):
    assert check_drift("--institution", "nowhere")[0] == 2
    assert check_drift("--weeks", "0")[0] == 2


def test_json_report_holds_every_week_and_figure(site, clinician, institution, tmp_path):
    analyse(clinician, tiles(*(lambda im, t=t: restain(t(im)) for t in SAME_TISSUE)), "S-JSON")
    out = tmp_path / "drift.json"
    assert check_drift("--min-patches", "5", "--weeks", "3", "--json", str(out))[0] == 1
    (report,) = json.loads(out.read_text())
    assert report["institution"] == "stmarys" and report["baseline"]["site_validation"] == site.pk
    assert len(report["weeks"]) == 3 and [w["judged"] for w in report["weeks"]] == [False, True, True]
    keys = [f["key"] for f in report["weeks"][-1]["figures"]]
    assert {"od_h", "od_e", "sharpness", "qc_rejections.not_he", "mean_uncertainty", "class_mix.TUM"} <= set(keys)
    assert "od_h" in {f["key"] for f in report["drifted"]}


def test_mean_band_needs_both_a_large_z_and_a_large_shift():
    # A huge week: a 10% shift is 20 standard errors, yet below the 15% that matters.
    low, high = drift.band_mean(baseline=1.0, std=0.5, n=10_000)
    assert (low, high) == pytest.approx((0.85, 1.15))
    # A small week: a 50% shift is only 2 standard errors.
    low, high = drift.band_mean(baseline=1.0, std=0.5, n=4)
    assert (low, high) == pytest.approx((0.0, 2.0))


def test_rate_band_is_three_standard_errors_and_at_least_ten_points():
    assert drift.band_rate(baseline=0.0, baseline_n=100, n=20) == pytest.approx((0.0, 0.1))
    low, high = drift.band_rate(baseline=0.5, baseline_n=100, n=20)
    half = 3 * (0.25 * (1 / 20 + 1 / 100)) ** 0.5
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    too_few = drift.judge_rate(key="x", label="x", group="qc", hits=5, n=4, baseline=0.0, baseline_n=9, min_patches=5)
    assert too_few.status == drift.TOO_FEW


def test_drift_page_is_for_administrators(site, clinician, institution, client, pathologist, other_institution):
    analyse(clinician, tiles(*(lambda im, t=t: restain(t(im)) for t in SAME_TISSUE)), "S-PAGE")
    verified_login(client, pathologist)
    assert client.get("/monitoring/drift/").status_code == 403
    assert client.get("/monitoring/drift/inputs.png").status_code == 403
    verified_login(client, make_user(institution, User.Role.ADMIN))
    page = client.get("/monitoring/drift/?weeks=4").content.decode()
    assert 'id="out-of-band"' not in page  # 14 patches: below the default minimum of 20
    page = client.get("/monitoring/drift/").content.decode()
    assert f"site validation #{site.pk}" in page and 'href="/monitoring/drift/"' in page
    for group in drift.GROUPS:
        chart = client.get(f"/monitoring/drift/{group}.png")
        assert chart.status_code == 200 and chart.content[:4] == b"\x89PNG", group
    assert client.get("/monitoring/drift/nothing.png").status_code == 404
    # An administrator sees only their own institution, whatever they ask for.
    assert "St Mary" in client.get(f"/monitoring/drift/?institution={other_institution.slug}").content.decode()


def test_out_of_band_figure_is_named_on_the_page(site, clinician, institution, client, settings):
    settings.DRIFT_MIN_PATCHES = 5
    analyse(clinician, tiles(*(lambda im, t=t: restain(t(im)) for t in SAME_TISSUE)), "S-NAMED")
    verified_login(client, make_user(institution, User.Role.ADMIN))
    page = client.get("/monitoring/drift/").content.decode()
    assert 'id="out-of-band"' in page and 'data-figure="od_h"' in page
    assert 'id="drift-banner"' in page and "Haematoxylin OD (mean)" in page


def test_superuser_chooses_the_institution(site, clinician, institution, client, other_institution):
    verified_login(client, User.objects.create_superuser("root", password="not-a-real-pass-1"))
    page = client.get(f"/monitoring/drift/?institution={other_institution.slug}").content.decode()
    assert "No baseline" in page and "Other Hospital" in page
    page = client.get(f"/monitoring/drift/?institution={institution.slug}").content.decode()
    assert f"site validation #{site.pk}" in page
    assert client.get("/monitoring/drift/?institution=nowhere").status_code == 404


def test_banner_is_for_administrators_and_cached(
    site, clinician, institution, client, settings, django_assert_num_queries
):
    settings.DRIFT_MIN_PATCHES = 5
    analyse(clinician, tiles(*(lambda im, t=t: restain(t(im)) for t in SAME_TISSUE)), "S-BANNER")
    request = RequestFactory().get("/cases/")
    request.user = clinician
    with django_assert_num_queries(0):  # nothing for non-administrators, not even a cache read
        assert not drift_alert(request)["drift_alert"]
    request.user = make_user(institution, User.Role.ADMIN)
    alert = drift_alert(request)["drift_alert"]
    assert alert and "Haematoxylin OD (mean)" in alert["figures"]
    with django_assert_num_queries(0):  # cached per institution
        assert drift_alert(request)["drift_alert"]["week"] == alert["week"]
    verified_login(client, clinician)
    assert 'id="drift-banner"' not in client.get("/cases/").content.decode()
    verified_login(client, request.user)
    assert 'id="drift-banner"' in client.get("/cases/").content.decode()


def test_check_drift_clears_the_banner_cache(site, clinician, institution):
    admin = make_user(institution, User.Role.ADMIN)
    request = RequestFactory().get("/cases/")
    request.user = admin
    assert not drift_alert(request)["drift_alert"]  # quiet, and cached as quiet
    analyse(clinician, tiles(*(lambda im, t=t: restain(t(im)) for t in SAME_TISSUE)), "S-CLEAR")
    assert check_drift("--min-patches", "5")[0] == 1
    # The banner uses the default minimum (20); 14 patches are too few, but the cache was renewed.
    assert cache.get(drift._banner_key(institution.pk)) is None


def test_shared_data_site_is_quiet_then_drifts_when_restained(institution, demo_model, clinician, settings):
    folder = shared_data() / "crc-val-he-7k-png"
    settings.SITE_VALIDATION_MIN_PER_CLASS = 1
    images = site_images_from_folder(directory=folder, classes=list(demo_model.classes))
    site = site_validate(
        institution=institution,
        model_version=demo_model,
        images=images,
        data_source=str(folder),
        min_per_class=1,
        actor="test",
    )
    paths = [image.path for image in images]
    analyse(clinician, tiles(ImageOps.mirror, paths=paths), "S-SHARED")  # 32 tiles: the default minimum applies
    status, out = check_drift()
    assert status == 0, out
    analyse(clinician, tiles(lambda im: restain(im.rotate(90)), paths=paths), "S-SHARED-2")
    status, out = check_drift()
    assert status == 1, out
    (event,) = drift_events()
    assert event.after["site_validation"] == site.pk
    assert "od_h" in {f["key"] for f in event.after["figures"]}
