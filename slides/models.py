"""Whole-slide images: the slide as uploaded, the chunks its tiles are analysed in, and the
suspicious regions that became patches of the case.

Tile results are not rows: they are arrays in storage (``results_name``, one value per grid tile);
the database holds the counts and the summary.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from accounts.models import LabSystem
from cases.models import BiopsyCase, TissuePatch


class Slide(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        TILING = "tiling", "Finding tissue"
        ANALYSING = "analysing", "Analysing tiles"
        FINISHING = "finishing", "Putting results together"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    PENDING = (Status.QUEUED, Status.TILING, Status.ANALYSING, Status.FINISHING)

    case = models.ForeignKey(BiopsyCase, on_delete=models.PROTECT, related_name="slides")
    storage_name = models.CharField(
        max_length=200, unique=True, editable=False, help_text="Server-generated name in storage; stored as uploaded."
    )
    original_name = models.CharField(max_length=255, help_text="Uploaded file name, sanitised; display only.")
    sha256 = models.CharField(max_length=64, help_text="SHA-256 of the file as uploaded and stored.")
    size_bytes = models.PositiveBigIntegerField(help_text="File size in bytes.")
    vendor = models.CharField(
        max_length=40, help_text="Format as OpenSlide names it (aperio, hamamatsu, generic-tiff ...)."
    )
    width = models.PositiveBigIntegerField(help_text="Level-0 width in pixels.")
    height = models.PositiveBigIntegerField(help_text="Level-0 height in pixels.")
    mpp = models.FloatField(help_text="Level-0 micrometres per pixel.")
    mpp_source = models.CharField(max_length=8, help_text="'file' (the scanner's) or 'given' (the uploader's).")
    levels = models.JSONField(help_text="[width, height, downsample] per pyramid level, level 0 first.")
    objective_power = models.FloatField(null=True, blank=True, help_text="Scanner objective (20, 40), when known.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    failure_reason = models.TextField(blank=True, help_text="Why the slide could not be analysed.")
    model_version = models.ForeignKey(
        "inference.ModelVersion",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="The model its tiles are analysed with (fixed when tiling starts).",
    )
    grid = models.JSONField(
        default=dict,
        blank=True,
        help_text="The tile grid: cols, rows, step (level-0 px per tile), level, tile_px, model_mpp.",
    )
    tiles_total = models.PositiveIntegerField(default=0, help_text="Tissue tiles to analyse.")
    tiles_done = models.PositiveIntegerField(default=0, help_text="Tiles with a result.")
    tiles_unassessable = models.PositiveIntegerField(default=0, help_text="Tiles that failed the quality check.")
    tiles_failed = models.PositiveIntegerField(default=0, help_text="Tiles that could not be read or analysed.")
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_finished = models.PositiveIntegerField(default=0, help_text="Chunks with an outcome (done or failed).")
    results_name = models.CharField(max_length=200, blank=True, help_text="Per-tile result arrays (.npz) in storage.")
    results_sha256 = models.CharField(max_length=64, blank=True, help_text="SHA-256 of the result arrays file.")
    tumour_fraction = models.FloatField(
        null=True, blank=True, help_text="Share of analysed tissue area with TUM at or above the threshold, 0..1."
    )
    tumour_threshold = models.FloatField(
        null=True, blank=True, help_text="The site's TUM operating point the slide was judged by."
    )
    site_validation = models.ForeignKey(
        "inference.SiteValidation",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="The passing site validation whose threshold the slide was judged by; empty: not validated at "
        "this site (the model's default threshold applied).",
    )
    suspected_tumour = models.BooleanField(
        null=True, blank=True, help_text="A tile reaches the site's TUM threshold; empty until analysed."
    )
    enqueued_at = models.DateTimeField(help_text="When the slide's current stage was last requested.")
    claim_token = models.UUIDField(null=True, blank=True, editable=False)
    claimed_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="The worker holding the current stage.")
    attempts = models.PositiveSmallIntegerField(default=0, help_text="Claims of tiling and finishing.")
    analysis_started_at = models.DateTimeField(null=True, blank=True, help_text="When tiles began to be analysed.")
    finished_at = models.DateTimeField(null=True, blank=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    uploaded_by_lab = models.ForeignKey(LabSystem, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.case.accession}/{self.original_name}"

    @staticmethod
    def new_storage_name(institution_id: int, suffix: str) -> str:
        return f"slides/{institution_id}/{uuid.uuid4().hex}{suffix}"

    @property
    def work_prefix(self) -> str:
        """Where the job keeps its arrays in storage (grid, chunks, results)."""
        return f"slide-results/{self.case.institution_id}/{self.pk}"

    @property
    def tiles_finished(self) -> int:
        return self.tiles_done + self.tiles_unassessable + self.tiles_failed


class SlideChunk(models.Model):
    """A few hundred consecutive tissue tiles of a slide (``start:stop`` of its grid): the unit one
    worker task claims, analyses and commits on its own."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    slide = models.ForeignKey(Slide, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    start = models.PositiveIntegerField(help_text="First tile (position in the grid's tissue tiles).")
    stop = models.PositiveIntegerField(help_text="One past the last tile.")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED)
    enqueued_at = models.DateTimeField()
    claim_token = models.UUIDField(null=True, blank=True, editable=False)
    claimed_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="The worker that claimed it last.")
    attempts = models.PositiveSmallIntegerField(default=0)
    tiles_done = models.PositiveIntegerField(default=0)
    tiles_unassessable = models.PositiveIntegerField(default=0)
    tiles_failed = models.PositiveIntegerField(default=0)
    seconds = models.FloatField(null=True, blank=True, help_text="Wall time of the analysis that was committed.")
    result_name = models.CharField(
        max_length=200, blank=True, help_text="The committed analysis's arrays (.npz) in storage, named by its claim."
    )
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["slide", "index"]
        constraints = [models.UniqueConstraint(fields=["slide", "index"], name="unique_slide_chunk")]
        indexes = [models.Index(fields=["status", "enqueued_at"], name="slidechunk_status_enqueued")]

    def __str__(self) -> str:
        return f"slide {self.slide_id} chunk {self.index}"


class SlideRegion(models.Model):
    """One of a slide's most suspicious tiles, turned into a patch of the case for review."""

    slide = models.ForeignKey(Slide, on_delete=models.PROTECT, related_name="regions")
    rank = models.PositiveSmallIntegerField(help_text="1 = the highest TUM probability.")
    patch = models.OneToOneField(
        TissuePatch, on_delete=models.PROTECT, null=True, blank=True, related_name="slide_region"
    )
    col = models.PositiveIntegerField(help_text="Grid column.")
    row = models.PositiveIntegerField(help_text="Grid row.")
    x = models.PositiveBigIntegerField(help_text="Level-0 left edge, pixels.")
    y = models.PositiveBigIntegerField(help_text="Level-0 top edge, pixels.")
    width = models.PositiveIntegerField(help_text="Level-0 pixels.")
    height = models.PositiveIntegerField(help_text="Level-0 pixels.")
    score = models.FloatField(help_text="The tile's TUM probability, 0..1.")

    class Meta:
        ordering = ["slide", "rank"]
        constraints = [models.UniqueConstraint(fields=["slide", "rank"], name="unique_slide_region_rank")]

    def __str__(self) -> str:
        return f"slide {self.slide_id} region {self.rank}"


class SlideUpload(models.Model):
    """A resumable upload in progress: bytes arrive in pieces at increasing offsets into a file of
    its own (``SLIDE_UPLOAD_DIR``); once all have arrived the file is checked and becomes a Slide.

    The protocol follows tus.io's core: create with the total size, send pieces with their offset,
    ask for the offset to resume."""

    class Status(models.TextChoices):
        RECEIVING = "receiving", "Receiving"
        COMPLETE = "complete", "Complete"
        REJECTED = "rejected", "Rejected"
        ABORTED = "aborted", "Aborted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    case = models.ForeignKey(BiopsyCase, on_delete=models.CASCADE, related_name="slide_uploads")
    original_name = models.CharField(max_length=255)
    size_bytes = models.PositiveBigIntegerField(help_text="Total size the uploader announced.")
    received_bytes = models.PositiveBigIntegerField(default=0)
    sha256 = models.CharField(
        max_length=64, blank=True, help_text="SHA-256 the uploader announced, checked at the end."
    )
    mpp = models.FloatField(null=True, blank=True, help_text="µm/px the uploader gave, for files that do not say.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.RECEIVING)
    error = models.TextField(blank=True, help_text="Why the file was rejected.")
    slide = models.OneToOneField(Slide, on_delete=models.SET_NULL, null=True, blank=True, related_name="upload")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    created_by_lab = models.ForeignKey(LabSystem, on_delete=models.CASCADE, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.original_name} ({self.received_bytes}/{self.size_bytes})"
