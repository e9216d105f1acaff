"""REST API for whole-slide images: the resumable upload, and slides with their progress and results.

Upload (the same protocol the web page uses, after tus.io's core)::

    POST   /api/v1/cases/{id}/slides/        {"name", "size", "sha256"?, "mpp"?} -> 201, Location: the upload
    PATCH  /api/v1/slide-uploads/{uuid}/     body: bytes from Upload-Offset (Content-Type
                                             application/offset+octet-stream) -> 200 with the new offset;
                                             the last piece returns the slide (201)
    HEAD   /api/v1/slide-uploads/{uuid}/     Upload-Offset: where to resume
    DELETE /api/v1/slide-uploads/{uuid}/     give up

Every query is scoped to the caller's institution: another institution's case, upload or slide is a 404.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import Prefetch
from django.http import Http404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    inline_serializer,
)
from rest_framework import serializers, status
from rest_framework.parsers import BaseParser
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import Scope
from cases.api import ERRORS, PROBLEM, _can_read_results
from cases.selectors import cases_visible_to
from cloudiopsy.api import problem_response
from slides.jobs import slide_progress
from slides.models import Slide, SlideRegion, SlideUpload
from slides.selectors import slides_visible_to
from slides.services import (
    OffsetMismatch,
    SlideRejected,
    slide_upload_abort,
    slide_upload_append,
    slide_upload_start,
)

OFFSET_HEADER = "Upload-Offset"
PIECE_TYPE = "application/offset+octet-stream"


class RegionSerializer(serializers.ModelSerializer):
    patch = serializers.IntegerField(
        source="patch_id", allow_null=True, help_text="The patch of the case made from this region, for review."
    )

    class Meta:
        model = SlideRegion
        fields = ["rank", "score", "x", "y", "width", "height", "col", "row", "patch"]


PROGRESS = inline_serializer(
    "SlideProgress",
    {
        "tiles_total": serializers.IntegerField(),
        "tiles_finished": serializers.IntegerField(),
        "tiles_done": serializers.IntegerField(),
        "tiles_unassessable": serializers.IntegerField(),
        "tiles_failed": serializers.IntegerField(),
        "chunks_total": serializers.IntegerField(),
        "chunks_finished": serializers.IntegerField(),
        "fraction": serializers.FloatField(help_text="Tiles finished of the total, 0..1."),
        "eta_seconds": serializers.FloatField(allow_null=True, help_text="Estimated seconds left; null until known."),
    },
)
RESULTS = inline_serializer(
    "SlideResults",
    {
        "tumour_fraction": serializers.FloatField(
            allow_null=True,
            help_text="Share of the analysed tissue area whose TUM probability is at or above the threshold.",
        ),
        "tumour_threshold": serializers.FloatField(allow_null=True),
        "suspected_tumour": serializers.BooleanField(
            allow_null=True, help_text="At least one tile reaches the site's TUM threshold."
        ),
        "validated_at_site": serializers.BooleanField(),
        "model_version": serializers.CharField(),
        "regions": RegionSerializer(many=True),
    },
)


class SlideSerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="original_name")
    status_display = serializers.CharField(source="get_status_display")
    progress = serializers.SerializerMethodField()
    results = serializers.SerializerMethodField()
    links = serializers.SerializerMethodField()

    class Meta:
        model = Slide
        fields = [
            "id",
            "case",
            "name",
            "status",
            "status_display",
            "failure_reason",
            "size_bytes",
            "sha256",
            "vendor",
            "width",
            "height",
            "mpp",
            "mpp_source",
            "levels",
            "objective_power",
            "created_at",
            "finished_at",
            "progress",
            "results",
            "links",
        ]

    @extend_schema_field(PROGRESS)
    def get_progress(self, slide: Slide) -> dict:
        return slide_progress(slide)

    @extend_schema_field(RESULTS)
    def get_results(self, slide: Slide) -> dict | None:
        if slide.status != Slide.Status.DONE or not self.context.get("results"):
            return None
        return {
            "tumour_fraction": slide.tumour_fraction,
            "tumour_threshold": slide.tumour_threshold,
            "suspected_tumour": slide.suspected_tumour,
            "validated_at_site": slide.site_validation_id is not None,
            "model_version": str(slide.model_version),
            "regions": RegionSerializer(slide.regions.all(), many=True).data,
        }

    @extend_schema_field(inline_serializer("SlideLinks", {"viewer": serializers.CharField()}))
    def get_links(self, slide: Slide) -> dict:
        return {"viewer": reverse("slides:detail", args=[slide.pk])}


class UploadSerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="original_name")
    offset = serializers.IntegerField(source="received_bytes", help_text="Bytes received: send the rest from here.")
    size = serializers.IntegerField(source="size_bytes")
    piece_max_bytes = serializers.SerializerMethodField()
    slide = serializers.SerializerMethodField()

    class Meta:
        model = SlideUpload
        fields = ["id", "case", "name", "size", "offset", "status", "error", "piece_max_bytes", "slide", "created_at"]

    def get_piece_max_bytes(self, upload) -> int:
        return settings.SLIDE_UPLOAD_PIECE_BYTES

    @extend_schema_field(SlideSerializer(allow_null=True))
    def get_slide(self, upload: SlideUpload) -> dict | None:
        if upload.slide_id is None:
            return None
        return SlideSerializer(upload.slide, context=self.context).data


class UploadStartSerializer(serializers.Serializer):
    name = serializers.CharField(
        max_length=255, help_text="The slide's file name, with its extension (.svs, .tiff ...)."
    )
    size = serializers.IntegerField(min_value=0, help_text="The file's size in bytes.")
    sha256 = serializers.CharField(
        required=False, allow_blank=True, default="", help_text="Optional; checked at the end."
    )
    mpp = serializers.FloatField(
        required=False,
        allow_null=True,
        default=None,
        help_text="Level-0 µm per pixel, for a file that does not say (the file's own value wins).",
    )


def _slides_with_regions(slides=None):
    return (
        (Slide.objects if slides is None else slides)
        .select_related("case", "model_version")
        .prefetch_related(Prefetch("regions", queryset=SlideRegion.objects.order_by("rank")))
    )


class CaseSlides(APIView):
    """The slides of a case (GET), or start a resumable upload of one (POST)."""

    required_scopes = {"GET": Scope.CASES_READ, "POST": Scope.PATCHES_WRITE}

    @extend_schema(responses={200: SlideSerializer(many=True), **ERRORS})
    def get(self, request, pk: int):
        case = cases_visible_to(principal=request.user).filter(pk=pk).first()
        if case is None:
            raise Http404
        slides = _slides_with_regions().filter(case=case).order_by("id")
        context = {"results": _can_read_results(request.user)}
        return Response(SlideSerializer(slides, many=True, context=context).data)

    @extend_schema(
        request=UploadStartSerializer,
        responses={
            201: UploadSerializer,
            **ERRORS,
            413: OpenApiResponse(PROBLEM, description="The file is larger than SLIDE_MAX_BYTES."),
        },
    )
    def post(self, request, pk: int):
        case = cases_visible_to(principal=request.user).filter(pk=pk).first()
        if case is None:
            raise Http404
        form = UploadStartSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        try:
            upload = slide_upload_start(case=case, actor=request.user, **form.validated_data)
        except SlideRejected as exc:
            return problem_response(exc.status_code, str(exc), kind="slide-rejected")
        url = reverse("api:slide-upload", args=[upload.pk])
        response = Response(UploadSerializer(upload).data, status=status.HTTP_201_CREATED)
        response["Location"] = url
        response[OFFSET_HEADER] = "0"
        return response


class PieceParser(BaseParser):
    """The body of a PATCH is raw bytes; the view reads them from the stream itself, in blocks."""

    media_type = PIECE_TYPE

    def parse(self, stream, media_type=None, parser_context=None):
        return stream


OFFSET = OpenApiParameter(
    OFFSET_HEADER, OpenApiTypes.INT, OpenApiParameter.HEADER, required=True, description="Where this piece starts."
)


class SlideUploadDetail(APIView):
    """One resumable upload: where it stands (GET/HEAD), its next piece (PATCH), give up (DELETE)."""

    parser_classes = [PieceParser]
    required_scopes = {
        "GET": Scope.CASES_READ,
        "HEAD": Scope.CASES_READ,
        "PATCH": Scope.PATCHES_WRITE,
        "DELETE": Scope.PATCHES_WRITE,
    }

    def _upload(self, request, pk) -> SlideUpload:
        upload = (
            SlideUpload.objects.filter(pk=pk, case__in=cases_visible_to(principal=request.user))
            .select_related("case", "slide__case", "slide__model_version")
            .first()
        )
        if upload is None:
            raise Http404
        return upload

    def _answer(self, request, upload: SlideUpload, code: int = 200) -> Response:
        data = UploadSerializer(upload, context={"results": _can_read_results(request.user)}).data
        response = Response(data, status=code)
        response[OFFSET_HEADER] = str(upload.received_bytes)
        response["Upload-Length"] = str(upload.size_bytes)
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(responses={200: UploadSerializer, **ERRORS})
    def get(self, request, pk):
        return self._answer(request, self._upload(request, pk))

    @extend_schema(
        parameters=[OFFSET],
        request={PIECE_TYPE: OpenApiTypes.BINARY},
        responses={
            200: OpenApiResponse(UploadSerializer, description="Piece stored; send the next from `offset`."),
            201: OpenApiResponse(UploadSerializer, description="Last piece: the file was checked and is now `slide`."),
            **ERRORS,
            409: OpenApiResponse(PROBLEM, description="Wrong offset: resume from the `Upload-Offset` header."),
            413: OpenApiResponse(PROBLEM, description="Piece larger than `piece_max_bytes`."),
            415: OpenApiResponse(PROBLEM, description="Content-Type must be application/offset+octet-stream."),
            503: OpenApiResponse(PROBLEM, description="The slide store cannot be written to now; nothing was stored."),
            507: OpenApiResponse(PROBLEM, description="The slide store is full; nothing was stored."),
        },
    )
    def patch(self, request, pk):
        upload = self._upload(request, pk)
        if request.content_type.split(";")[0].strip() != PIECE_TYPE:
            return problem_response(415, f"send the piece's bytes with Content-Type: {PIECE_TYPE}", kind="media-type")
        try:
            offset = int(request.headers.get(OFFSET_HEADER, ""))
            length = int(request.META.get("CONTENT_LENGTH") or 0)  # no body: an empty piece
        except ValueError:
            return problem_response(
                400, f"the {OFFSET_HEADER} and Content-Length headers must be whole numbers", kind="invalid-request"
            )
        if offset < 0 or length < 0:
            return problem_response(
                400, f"{OFFSET_HEADER} and Content-Length cannot be negative", kind="invalid-request"
            )
        try:
            upload = slide_upload_append(upload=upload, offset=offset, data=request._request, length=length)
        except OffsetMismatch as exc:
            response = problem_response(409, str(exc), kind="offset-mismatch", offset=exc.expected)
            response[OFFSET_HEADER] = str(exc.expected)
            return response
        except SlideRejected as exc:
            upload.refresh_from_db()
            response = problem_response(exc.status_code, str(exc), kind="slide-rejected", offset=upload.received_bytes)
            response[OFFSET_HEADER] = str(upload.received_bytes)
            return response
        complete = upload.status == SlideUpload.Status.COMPLETE
        return self._answer(request, self._upload(request, pk), code=201 if complete else 200)

    @extend_schema(responses={204: None, **ERRORS})
    def delete(self, request, pk):
        slide_upload_abort(upload=self._upload(request, pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class SlideDetail(APIView):
    """One slide: its file, the analysis's progress and (with the results:read scope) its results."""

    required_scopes = {"GET": Scope.CASES_READ}

    @extend_schema(responses={200: SlideSerializer, **ERRORS})
    def get(self, request, pk: int):
        slide = _slides_with_regions(slides_visible_to(user=request.user)).filter(pk=pk).first()
        if slide is None:
            raise Http404
        response = Response(SlideSerializer(slide, context={"results": _can_read_results(request.user)}).data)
        response["Cache-Control"] = "no-store"
        return response
