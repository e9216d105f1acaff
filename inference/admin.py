import json

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from accounts.models import Institution
from cloudiopsy.admin_tenancy import TenantReadOnlyAdmin, TenantReadOnlyTabularInline, is_operator, scope
from inference.core import evaluation
from inference.core.card import model_card
from inference.models import ModelActivation, ModelVersion, Prediction, SiteValidation, WorkerHeartbeat
from inference.sites import (
    DEFAULT_MIN_PER_CLASS,
    REVIEWS_SOURCE,
    SiteValidationError,
    site_images_from_reviews,
    site_validate,
)


class ModelActivationInline(TenantReadOnlyTabularInline):
    model = ModelActivation
    fk_name = "model_version"
    fields = ["created_at", "actor", "previous", "reason"]


@admin.register(ModelVersion)
class ModelVersionAdmin(TenantReadOnlyAdmin):
    """Model versions are the same for every institution: registered and activated by operators
    with `register_model` / `activate_model` (files verified, site validations checked, the switch
    recorded); here they are read, by institution administrators too."""

    list_display = ["name", "version", "is_active", "input_size", "created_at", "activated_at"]
    list_filter = ["is_active"]
    readonly_fields = [
        "name",
        "version",
        "path",
        "file_sha256",
        "classes",
        "input_size",
        "preprocessing",
        "model_card",
        "metadata_pretty",
        "is_active",
        "created_at",
        "activated_at",
        "activated_by",
    ]
    exclude = ["metadata"]
    inlines = [ModelActivationInline]
    institution_field = None

    @admin.display(description="model card")
    def model_card(self, obj):
        return format_html('<pre style="white-space:pre-wrap">{}</pre>', model_card(obj.metadata))

    @admin.display(description="metadata")
    def metadata_pretty(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.metadata, indent=2))


@admin.register(Prediction)
class PredictionAdmin(TenantReadOnlyAdmin):
    """A prediction is the AI's record and is never edited."""

    list_display = ["patch", "label", "needs_attention", "model_version", "created_at"]
    list_filter = ["model_version", "label", "needs_attention"]
    list_select_related = ["patch__case", "model_version"]  # a patch is shown with its case's accession


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(TenantReadOnlyAdmin):
    """Written by the workers (for /healthz); platform infrastructure, for operators only
    (not in TENANT_PATHS)."""

    list_display = ["hostname", "last_seen", "started_at"]


@admin.register(ModelActivation)
class ModelActivationAdmin(TenantReadOnlyAdmin):
    """History of which model was active when, and who switched it (platform-wide: every
    institution's results depend on it, so their administrators may read it)."""

    list_display = ["created_at", "model_version", "previous", "actor", "reason"]
    list_select_related = ["model_version", "previous"]  # nullable: Django's automatic join leaves it out


def _interval(rate: dict | None) -> str:
    if not rate or rate.get("value") is None:
        return "n/a"
    return f"{rate['value']:.3f} ({rate['low']:.3f}-{rate['high']:.3f}, n = {rate['n']})"


class ReviewedPatchesValidationForm(forms.Form):
    institution = forms.ModelChoiceField(queryset=Institution.objects.none())
    model_version = forms.ModelChoiceField(queryset=ModelVersion.objects.all(), help_text="Default: the active one.")
    target_sensitivity = forms.FloatField(min_value=0.5, max_value=1.0, help_text="Tumour sensitivity to reach, 0..1.")
    min_per_class = forms.IntegerField(
        min_value=1,
        help_text="Refuse with fewer reviewed NORM or TUM patches than this; passing needs "
        f"{settings.SITE_VALIDATION_MIN_PER_CLASS} analysed per class.",
    )

    def __init__(self, *args, institutions, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["institution"].queryset = institutions


def _verdict(validation: SiteValidation) -> str:
    """Passed, or which of the two conditions failed, with the numbers."""
    if validation.passed:
        return "passed: results of this model are trusted at this site"
    checks = validation.metrics.get("checks", {})
    reasons = []
    if not checks.get("enough_per_class", True):
        counts = ", ".join(f"{c} {n}" for c, n in sorted(validation.counts.items()))
        reasons.append(f"fewer than {validation.metrics.get('min_per_class')} analysed patches in a class ({counts})")
    if not checks.get("target_reached", True):
        reasons.append(f"sensitivity {validation.sensitivity} below the target {validation.target_sensitivity}")
    return "not passed: " + ("; ".join(reasons) or "see the figures below")


@admin.register(SiteValidation)
class SiteValidationAdmin(TenantReadOnlyAdmin):
    """A model measured on one institution's own tissue, and the threshold chosen there. Written by
    ``validate_site`` or the "Validate on reviewed patches" page, never edited."""

    list_display = [
        "created_at",
        "institution",
        "model_version",
        "threshold_display",
        "sensitivity",
        "specificity",
        "passed",
        "data_source",
        "actor",
    ]
    list_filter = ["passed", "model_version"]
    list_select_related = ["institution", "model_version"]
    change_list_template = "inference/sitevalidation_change_list.html"
    fields = [
        "institution",
        "model_version",
        "passed",
        "threshold_display",
        "target_sensitivity",
        "sensitivity",
        "specificity",
        "summary",
        "plots",
        "counts",
        "data_source",
        "data_manifest_sha256",
        "created_at",
        "actor",
        "created_by",
        "metrics_pretty",
    ]
    readonly_fields = fields

    @admin.display(description="threshold (TUM probability)", ordering="threshold")
    def threshold_display(self, obj):
        return f"{obj.threshold:.4f}"

    @admin.display(description="metrics (95% intervals)")
    def summary(self, obj):
        m = obj.metrics
        point = m.get("operating_point", {})
        default = point.get("at_default_threshold", {})
        auc = m.get("roc_auc", {})
        calibration = m.get("calibration", {})
        quality = m.get("quality_check", {})
        rows = [
            ("result", _verdict(obj)),
            ("accuracy", _interval(m.get("accuracy")) + (f" ({m['note']})" if m.get("note") else "")),
            (
                "ROC AUC, TUM vs NORM",
                f"{auc.get('value')} (bootstrap {auc.get('low')}-{auc.get('high')}, {auc.get('resamples')} resamples)",
            ),
            (
                f"at threshold {obj.threshold:.4f}",
                f"sensitivity {_interval(point.get('sensitivity'))}; specificity {_interval(point.get('specificity'))}",
            ),
            (
                f"at the model's default {point.get('default_threshold')}",
                f"sensitivity {_interval(default.get('sensitivity'))}; "
                f"specificity {_interval(default.get('specificity'))}",
            ),
            (
                "calibration",
                f"ECE {m.get('ece')}; temperature refitted here {calibration.get('site_temperature')} "
                f"(model {calibration.get('model_temperature')}) gives ECE {calibration.get('ece_after')}",
            ),
            (
                "rejected by quality check",
                f"{quality.get('rejected')} ({quality.get('rate')}) {quality.get('by_reason') or ''}",
            ),
        ]
        for name, rates in m.get("per_class", {}).items():
            rows.append(
                (
                    name,
                    f"sensitivity {_interval(rates.get('sensitivity'))}; "
                    f"specificity {_interval(rates.get('specificity'))}",
                )
            )
        body = format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows)
        return format_html("<table>{}</table>", body)

    @admin.display(description="plots")
    def plots(self, obj):
        return format_html_join(
            " ",
            '<img src="{}" alt="{}" width="360" height="360">',
            (
                (reverse("admin:inference_sitevalidation_plot", args=[obj.pk, kind]), alt)
                for kind, alt in (("roc", "ROC curve"), ("reliability", "reliability diagram"))
            ),
        )

    @admin.display(description="all metrics")
    def metrics_pretty(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.metrics, indent=2))

    def get_urls(self):
        extra = [
            path(
                "validate-reviews/",
                self.admin_site.admin_view(self.validate_reviews_view),
                name="inference_sitevalidation_validate_reviews",
            ),
            path(
                "<path:object_id>/plot/<str:kind>.png",
                self.admin_site.admin_view(self.plot_view),
                name="inference_sitevalidation_plot",
            ),
        ]
        return extra + super().get_urls()

    def plot_view(self, request, object_id, kind):
        """The ROC curve or the reliability diagram of one validation, drawn from its stored metrics."""
        validation = self.get_object(request, object_id)  # institution-scoped queryset
        if validation is None or not self.has_view_permission(request, validation):
            raise Http404("no such site validation")
        m = validation.metrics
        if kind == "roc":
            point = m["operating_point"]
            png = evaluation.roc_png(
                m["roc_curve"],
                auc=m["roc_auc"]["value"],
                point=(1 - point["specificity"]["value"], point["sensitivity"]["value"]),
            )
        elif kind == "reliability":
            png = evaluation.reliability_png(m["reliability"], ece=m["ece"])
        else:
            raise Http404("no such plot")
        response = HttpResponse(png, content_type="image/png")
        response["Cache-Control"] = "private, no-store"
        return response

    def _institutions(self, request):
        return scope(Institution.objects.all(), user=request.user)

    def can_validate(self, request) -> bool:
        return is_operator(request.user) or (
            request.user.has_perm("inference.add_sitevalidation") and self._institutions(request).exists()
        )

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "can_validate": self.can_validate(request)}
        return super().changelist_view(request, extra_context)

    def validate_reviews_view(self, request):
        """Validate a model on an institution's own reviewed NORM and TUM patches (synchronously)."""
        if not self.can_validate(request):
            raise PermissionDenied
        active = ModelVersion.objects.filter(is_active=True).first()
        form = ReviewedPatchesValidationForm(
            request.POST or None,
            institutions=self._institutions(request),
            initial={
                "model_version": active,
                "target_sensitivity": settings.SITE_TARGET_SENSITIVITY,
                "min_per_class": DEFAULT_MIN_PER_CLASS,
            },
        )
        if request.method == "POST" and form.is_valid():
            institution = form.cleaned_data["institution"]
            version = form.cleaned_data["model_version"]
            try:
                validation = site_validate(
                    institution=institution,
                    model_version=version,
                    images=site_images_from_reviews(institution=institution, model_version=version),
                    data_source=REVIEWS_SOURCE,
                    target_sensitivity=form.cleaned_data["target_sensitivity"],
                    min_per_class=form.cleaned_data["min_per_class"],
                    user=request.user,
                    request=request,
                )
            except SiteValidationError as exc:
                self.message_user(request, f"{version} at {institution}: {exc}. Nothing was stored.", messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"{version} at {institution}: threshold {validation.threshold:.4f}, sensitivity "
                    f"{validation.sensitivity:.3f}, specificity {validation.specificity:.3f}: "
                    + ("passed." if validation.passed else "not passed."),
                    messages.SUCCESS if validation.passed else messages.WARNING,
                )
                return redirect("admin:inference_sitevalidation_change", validation.pk)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Validate on reviewed patches",
            "form": form,
        }
        return TemplateResponse(request, "inference/sitevalidation_validate.html", context)
