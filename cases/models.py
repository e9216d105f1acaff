"""Patients, biopsy cases and their tissue patches."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from accounts.models import Institution, LabSystem
from inference.core.preprocessing import STORAGE_SUFFIX


class Patient(models.Model):
    """Protected health information: visible only to users and lab systems of its institution."""

    class Sex(models.TextChoices):
        FEMALE = "female", "Female"
        MALE = "male", "Male"
        OTHER = "other", "Other"
        UNKNOWN = "unknown", "Unknown"

    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="patients")
    mrn = models.CharField("MRN", max_length=64, help_text="Medical record number, unique within the institution.")
    name = models.CharField(max_length=200, help_text="Patient's full name.")
    birth_date = models.DateField(null=True, blank=True, help_text="Date of birth.")
    sex = models.CharField(max_length=8, choices=Sex.choices, default=Sex.UNKNOWN, help_text="Administrative sex.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["mrn"]
        constraints = [models.UniqueConstraint(fields=["institution", "mrn"], name="unique_patient_mrn")]

    def __str__(self) -> str:
        return f"{self.mrn} {self.name}"


class BiopsyCase(models.Model):
    class Status(models.TextChoices):
        OPEN = "open", "Open"
        ANALYSING = "analysing", "Analysing"
        READY_FOR_REVIEW = "ready_for_review", "Ready for review"
        SIGNED_OUT = "signed_out", "Signed out"

    class Priority(models.TextChoices):
        ROUTINE = "routine", "Routine"
        URGENT = "urgent", "Urgent"

    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="cases")
    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="cases")
    accession = models.CharField(max_length=64, help_text="Laboratory accession number, unique within the institution.")
    specimen_site = models.CharField(max_length=120, help_text="Where the biopsy was taken, e.g. 'sigmoid colon'.")
    clinical_notes = models.TextField(blank=True, help_text="Clinical information for the pathologist.")
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.ROUTINE)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.OPEN, db_index=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    created_by_lab = models.ForeignKey(LabSystem, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    second_read = models.BooleanField(
        default=False, help_text="A second pathologist reviews blind to the first; disagreements are adjudicated."
    )
    assigned_to = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="assigned_cases",
        help_text="The pathologist responsible for the review.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Set by cases.transitions.case_transition (and at creation); read by the dashboards.
    status_changed_at = models.DateTimeField(
        default=timezone.now, editable=False, help_text="When the case entered its current status."
    )
    ready_for_review_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="When the case last became ready for review (every patch had a result); empty: never yet.",
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["institution", "accession"], name="unique_case_accession")]

    def __str__(self) -> str:
        return self.accession


class TissuePatch(models.Model):
    """One uploaded H&E image. The stored file is a lossless re-encoding under a server-generated name."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"
        UNASSESSABLE = "unassessable", "Unassessable"

    PENDING = (Status.QUEUED, Status.RUNNING)

    case = models.ForeignKey(BiopsyCase, on_delete=models.PROTECT, related_name="patches")
    storage_name = models.CharField(
        max_length=200, unique=True, editable=False, help_text="Server-generated path under MEDIA_ROOT."
    )
    sha256 = models.CharField(max_length=64, help_text="SHA-256 of the stored (re-encoded) file.")
    source_sha256 = models.CharField(max_length=64, help_text="SHA-256 of the file as uploaded.")
    width = models.PositiveIntegerField(help_text="Pixels.")
    height = models.PositiveIntegerField(help_text="Pixels.")
    format = models.CharField(max_length=8, help_text="Format of the uploaded file (PNG, JPEG or TIFF).")
    original_name = models.CharField(max_length=255, help_text="Uploaded file name, sanitised; display only.")
    um_per_px = models.FloatField(null=True, blank=True, help_text="Micrometres per pixel, when known.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    failure_reason = models.TextField(blank=True, help_text="Why analysis failed or the patch is unassessable.")
    failure_code = models.CharField(
        max_length=32,
        blank=True,
        help_text="The quality check an unassessable patch failed (blank, background, out_of_focus, not_he).",
    )
    enqueued_at = models.DateTimeField(help_text="When analysis was last requested.")
    claimed_at = models.DateTimeField(null=True, blank=True, help_text="When a worker last claimed it.")
    claim_token = models.UUIDField(null=True, blank=True, editable=False)
    attempts = models.PositiveSmallIntegerField(default=0, help_text="How many times a worker claimed it.")
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    uploaded_by_lab = models.ForeignKey(LabSystem, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["status", "enqueued_at"], name="patch_status_enqueued")]

    def __str__(self) -> str:
        return f"{self.case.accession}/{self.original_name}"

    @staticmethod
    def new_storage_name(institution_id: int) -> str:
        return f"patches/{institution_id}/{uuid.uuid4().hex}{STORAGE_SUFFIX}"


class Review(models.Model):
    """A pathologist's decision on one patch's AI result. It stands beside the Prediction and never
    edits it; a later review by the same pathologist supersedes an earlier one (both are kept)."""

    class Decision(models.TextChoices):
        CONFIRM = "confirm", "Confirm"
        OVERRIDE = "override", "Override"

    class Reason(models.TextChoices):
        WRONG_CLASS = "wrong_class", "Wrong class"
        POOR_QUALITY = "poor_quality", "Poor image quality"
        OUTSIDE_SCOPE = "outside_scope", "Outside the model's scope"
        OTHER = "other", "Other"

    patch = models.ForeignKey(TissuePatch, on_delete=models.PROTECT, related_name="reviews")
    prediction = models.ForeignKey("inference.Prediction", on_delete=models.PROTECT, related_name="reviews")
    pathologist = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")

    class Read(models.IntegerChoices):
        FIRST = 1, "First read"
        SECOND = 2, "Second read (blind)"
        ADJUDICATION = 3, "Adjudication"

    decision = models.CharField(max_length=10, choices=Decision.choices)
    read = models.PositiveSmallIntegerField(choices=Read.choices, default=Read.FIRST)
    final_label = models.CharField(max_length=32, help_text="The pathologist's class (the AI's when confirmed).")
    reason_code = models.CharField(max_length=20, choices=Reason.choices, blank=True)
    reason_text = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.patch_id}: {self.decision} {self.final_label}"


class SignOut(models.Model):
    """The case-level conclusion of a pathologist. After it the case is read-only but for addenda."""

    class Conclusion(models.TextChoices):
        ADENOCARCINOMA = "adenocarcinoma", "Adenocarcinoma present"
        NO_TUMOUR = "no_tumour", "No tumour in the submitted patches"
        NON_DIAGNOSTIC = "non_diagnostic", "Non-diagnostic"

    case = models.OneToOneField(BiopsyCase, on_delete=models.PROTECT, related_name="sign_out")
    pathologist = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    conclusion = models.CharField(max_length=20, choices=Conclusion.choices)
    tumour_fraction = models.FloatField(help_text="Share of reviewed patches whose final class is TUM, 0..1.")
    comment = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.case} {self.conclusion}"


class Addendum(models.Model):
    """A later note on a signed-out case, with its reason. Shown in order; never overwrites."""

    case = models.ForeignKey(BiopsyCase, on_delete=models.PROTECT, related_name="addenda")
    pathologist = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    text = models.TextField()
    reason = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        verbose_name_plural = "addenda"

    def __str__(self) -> str:
        return f"{self.case} addendum {self.pk}"
