"""REST API for lab systems (and signed-in staff): cases, patches and results under /api/v1/.

Every view names the token scope it needs per method (``required_scopes``); every query is
scoped to the caller's institution, so another institution's case is a 404.
"""

from __future__ import annotations

import io
import secrets

from django.core.files.storage import default_storage
from django.db.models import Prefetch
from django.http import Http404, HttpResponse
from django.http.multipartparser import MultiPartParser as DjangoMultiPartParser
from django.utils.dateparse import parse_datetime
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    inline_serializer,
)
from rest_framework import generics, serializers, status
from rest_framework.parsers import DataAndFiles, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import LabSystem, Scope
from accounts.permissions import institution_of
from audit.services import patient_read
from cases.fhir import case_bundle
from cases.models import Addendum, BiopsyCase, Patient, Review, SignOut, TissuePatch
from cases.review import review_visible
from cases.selectors import case_with_results, cases_visible_to
from cases.services import NoValidImage, PatientData, case_create, patch_upload
from cases.uploads import UploadRejected, check_file_name, read_uploads
from cloudiopsy.api import idempotent, problem_response
from inference.core.preprocessing import decode_rgb
from inference.models import Prediction


class TokenScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.LabSystemTokenAuthentication"
    name = "LabSystemToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Token <key>`: a lab-system token, created with `manage.py create_lab_token`.",
        }


PROBLEM = inline_serializer(
    "Problem",
    {
        "type": serializers.CharField(),
        "title": serializers.CharField(),
        "status": serializers.IntegerField(),
        "detail": serializers.CharField(),
        "errors": serializers.DictField(required=False, help_text="{field: [messages]} for invalid input"),
    },
)
ERRORS = {
    400: OpenApiResponse(PROBLEM, description="Invalid input (problem details, `errors` per field)."),
    401: OpenApiResponse(PROBLEM, description="Missing, invalid, revoked or expired token."),
    403: OpenApiResponse(PROBLEM, description="The token lacks the scope this call needs."),
    404: OpenApiResponse(PROBLEM, description="No such resource in your institution."),
    429: OpenApiResponse(PROBLEM, description="Rate limit: retry after the `Retry-After` seconds."),
}
IDEMPOTENCY = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="Optional. A retry with the same key and request returns the first response, "
    "without repeating the work; the same key with a different request is a 422.",
)


def _can_read_results(principal) -> bool:
    return not isinstance(principal, LabSystem) or principal.has_scope(Scope.RESULTS_READ)


def _can_read_cases(principal) -> bool:
    return not isinstance(principal, LabSystem) or principal.has_scope(Scope.CASES_READ)


class PatientSerializer(serializers.ModelSerializer):
    mrn = serializers.CharField(max_length=64, help_text="Medical record number, unique within the institution.")
    name = serializers.CharField(
        max_length=200,
        required=False,
        allow_blank=True,
        default="",
        help_text="In the answer to a token without cases:read: null (the stored patient is not disclosed).",
    )

    class Meta:
        model = Patient
        fields = ["mrn", "name", "birth_date", "sex"]


class PredictionSerializer(serializers.ModelSerializer):
    model_version = serializers.CharField(source="model_version.__str__", help_text="The exact model version.")
    suspected_tumour = serializers.BooleanField(
        read_only=True,
        allow_null=True,
        help_text="The TUM probability is at or above `tumour_threshold`, the operating point of this "
        "institution when the patch was analysed; null for a model without a TUM class or a result "
        "stored before operating points.",
    )
    tumour_threshold = serializers.FloatField(
        read_only=True,
        allow_null=True,
        help_text="The TUM-probability threshold (0..1) `suspected_tumour` was judged by: this site's "
        "validated threshold, or the model's default when `validated_at_site` is false.",
    )
    validated_at_site = serializers.BooleanField(
        read_only=True,
        help_text="The model version had passed a validation on this institution's own tissue; false: "
        "not validated at this site, the model's default threshold applied.",
    )

    class Meta:
        model = Prediction
        fields = [
            "label",
            "scores",
            "uncertainty",
            "needs_attention",
            "suspected_tumour",
            "tumour_threshold",
            "validated_at_site",
            "model_version",
            "created_at",
        ]


class ReviewSerializer(serializers.ModelSerializer):
    reviewed_at = serializers.DateTimeField(source="created_at")

    class Meta:
        model = Review
        fields = ["decision", "final_label", "reason_code", "reason_text", "reviewed_at"]


class PatchSerializer(serializers.ModelSerializer):
    prediction = serializers.SerializerMethodField(
        help_text="The latest AI result; null until analysed, or without the results:read scope."
    )
    review = serializers.SerializerMethodField(help_text="The latest pathologist review, or null.")

    class Meta:
        model = TissuePatch
        fields = [
            "id",
            "status",
            "failure_reason",
            "original_name",
            "format",
            "width",
            "height",
            "sha256",
            "created_at",
            "prediction",
            "review",
        ]

    @extend_schema_field(PredictionSerializer(allow_null=True))
    def get_prediction(self, patch: TissuePatch):
        if not self.context.get("results", True):
            return None
        prediction = next(iter(patch.predictions.all()), None)  # newest first (prefetched)
        return None if prediction is None else PredictionSerializer(prediction).data

    @extend_schema_field(ReviewSerializer(allow_null=True))
    def get_review(self, patch: TissuePatch):
        if not self.context.get("results", True):
            return None
        # During a blind second read, only a decided label or the caller's own read (never the other reader's).
        review = review_visible(case=patch.case, reviews=list(patch.reviews.all()), viewer=self.context.get("viewer"))
        return None if review is None else ReviewSerializer(review).data


class CaseSerializer(serializers.ModelSerializer):
    patient = PatientSerializer()

    class Meta:
        model = BiopsyCase
        fields = [
            "id",
            "accession",
            "status",
            "priority",
            "specimen_site",
            "clinical_notes",
            "patient",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "status", "created_at", "updated_at"]
        # Uniqueness of the accession is checked by the service, per institution.
        validators: list = []
        extra_kwargs = {"accession": {"validators": []}}


class SignOutSerializer(serializers.ModelSerializer):
    pathologist = serializers.CharField(source="pathologist.get_username")
    signed_out_at = serializers.DateTimeField(source="created_at")

    class Meta:
        model = SignOut
        fields = ["conclusion", "tumour_fraction", "comment", "pathologist", "signed_out_at"]


class AddendumSerializer(serializers.ModelSerializer):
    pathologist = serializers.CharField(source="pathologist.get_username")

    class Meta:
        model = Addendum
        fields = ["text", "reason", "pathologist", "created_at"]


class CaseDetailSerializer(CaseSerializer):
    patches = PatchSerializer(many=True, read_only=True)
    sign_out = serializers.SerializerMethodField(help_text="The pathologist's conclusion once signed out, or null.")
    addenda = AddendumSerializer(many=True, read_only=True)

    class Meta(CaseSerializer.Meta):
        fields = [*CaseSerializer.Meta.fields, "patches", "sign_out", "addenda"]

    @extend_schema_field(SignOutSerializer(allow_null=True))
    def get_sign_out(self, case: BiopsyCase):
        sign_out = getattr(case, "sign_out", None)
        return None if sign_out is None or not self.context.get("results", True) else SignOutSerializer(sign_out).data


CASE_EXAMPLE = OpenApiExample(
    "New case",
    request_only=True,
    value={
        "patient": {"mrn": "123456", "name": "Ada Example", "birth_date": "1961-03-04", "sex": "female"},
        "accession": "S26-0001",
        "specimen_site": "sigmoid colon",
        "priority": "urgent",
        "clinical_notes": "Polyp, 12 mm.",
    },
)


class CaseListCreate(generics.ListCreateAPIView):
    """List your institution's cases (newest first) or create one."""

    serializer_class = CaseSerializer
    required_scopes = {"GET": Scope.CASES_READ, "POST": Scope.CASES_WRITE}

    def get_queryset(self):
        cases = cases_visible_to(principal=self.request.user).order_by("-created_at", "-id")
        params = self.request.query_params
        if params.get("status"):
            cases = cases.filter(status=params["status"])
        if params.get("accession"):
            cases = cases.filter(accession=params["accession"])
        if params.get("updated_since"):
            cases = cases.filter(updated_at__gte=self._updated_since(params["updated_since"]))
        return cases

    @staticmethod
    def _updated_since(value: str):
        try:
            moment = parse_datetime(value)
        except ValueError:  # well-formed but impossible, e.g. 2026-02-31
            moment = None
        if moment is None or moment.tzinfo is None:
            raise serializers.ValidationError({"updated_since": ["An ISO 8601 date-time with a time zone."]})
        return moment

    @extend_schema(
        parameters=[
            OpenApiParameter("status", OpenApiTypes.STR, enum=BiopsyCase.Status.values),
            OpenApiParameter("accession", OpenApiTypes.STR, description="Exact accession number."),
            OpenApiParameter("updated_since", OpenApiTypes.DATETIME, description="Cases changed at or after."),
        ],
        responses={200: CaseSerializer(many=True), **{k: v for k, v in ERRORS.items() if k != 404}},
    )
    def get(self, request, *args, **kwargs):
        if request.query_params.get("status") and request.query_params["status"] not in BiopsyCase.Status.values:
            raise serializers.ValidationError({"status": [f"One of {', '.join(BiopsyCase.Status.values)}."]})
        return super().get(request, *args, **kwargs)

    def paginate_queryset(self, queryset):
        page = super().paginate_queryset(queryset)
        patient_read(
            principal=self.request.user,
            patients=[c.patient for c in page or []],
            via="api case list",
            request=self.request,
        )
        return page

    @extend_schema(
        parameters=[IDEMPOTENCY],
        examples=[CASE_EXAMPLE],
        responses={201: CaseSerializer, **{k: v for k, v in ERRORS.items() if k != 404}},
    )
    def post(self, request, *args, **kwargs):
        return idempotent(request, lambda: self._create(request))

    def _create(self, request) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        case = case_create(
            institution=institution_of(request.user),
            created_by=request.user,
            patient=PatientData(**data["patient"]),
            accession=data["accession"],
            specimen_site=data["specimen_site"],
            priority=data.get("priority", BiopsyCase.Priority.ROUTINE),
            clinical_notes=data.get("clinical_notes", ""),
        )
        data = CaseSerializer(case).data
        if _can_read_cases(request.user):
            # The patient may have been on file already: the answer shows what is stored.
            patient_read(principal=request.user, patients=[case.patient], via="api case create", request=request)
        else:
            # A write-only token learns ids, not who the stored patient with that MRN is.
            data["patient"] = {"mrn": case.patient.mrn, "name": None, "birth_date": None, "sex": None}
        return Response(data, status=status.HTTP_201_CREATED)


class CaseDetail(APIView):
    """A case with its patches and (with the results:read scope) their AI results."""

    required_scopes = {"GET": Scope.CASES_READ}

    @extend_schema(responses={200: CaseDetailSerializer, **ERRORS})
    def get(self, request, pk: int):
        try:
            case = case_with_results(principal=request.user, case_id=pk)
        except BiopsyCase.DoesNotExist:
            raise Http404 from None
        patient_read(principal=request.user, patients=[case.patient], via="api case", request=request, case=case)
        context = {"results": _can_read_results(request.user), "viewer": request.user}
        return Response(CaseDetailSerializer(case, context=context).data)


class _NameCheckingDjangoParser(DjangoMultiPartParser):
    """Django strips directories from uploaded file names silently; we refuse such files instead,
    so a client sending '../../etc/passwd.png' learns that its name was not acceptable.

    A refused file keeps flowing through the parser under a placeholder name (skipping it
    would leave its bytes unread in the stream); the view reports it with its original name.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused: list[tuple[str, str]] = []
        self.placeholder = f"refused-{secrets.token_hex(12)}-"  # unguessable: no client can fake one

    def sanitize_file_name(self, file_name):
        try:
            check_file_name(file_name)
        except UploadRejected as exc:
            self.refused.append((file_name, str(exc)))
            return f"{self.placeholder}{len(self.refused) - 1}"
        return super().sanitize_file_name(file_name)


class NameCheckingMultiPartParser(MultiPartParser):
    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        request = parser_context["request"]
        meta = request.META.copy()
        meta["CONTENT_TYPE"] = media_type
        parser = _NameCheckingDjangoParser(
            meta, stream, request.upload_handlers, parser_context.get("encoding", "utf-8")
        )
        data, files = parser.parse()
        request.refused_file_names = (parser.placeholder, parser.refused)
        return DataAndFiles(data, files)


def _split_refused(request) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
    """(accepted name and bytes, refused name and reason) of the uploaded 'image' files."""
    uploads = request.FILES.getlist("image")  # parses the body, which sets refused_file_names
    placeholder, refused_names = getattr(request, "refused_file_names", ("", []))
    named_badly = [u for u in uploads if placeholder and u.name.startswith(placeholder)]
    files, refused = read_uploads([u for u in uploads if u not in named_badly])
    return files, [refused_names[int(u.name.removeprefix(placeholder))] for u in named_badly] + refused


UPLOAD_RESULT = inline_serializer(
    "UploadResult",
    {
        "case": serializers.IntegerField(),
        "patches": inline_serializer(
            "QueuedPatch",
            {
                "id": serializers.IntegerField(),
                "status": serializers.CharField(),
                "original_name": serializers.CharField(),
            },
            many=True,
        ),
        "rejected": inline_serializer(
            "RejectedFile", {"file": serializers.CharField(), "error": serializers.CharField()}, many=True
        ),
    },
)


class CasePatchUpload(APIView):
    """Upload one or more H&E patches (PNG, JPEG or TIFF) to a case; each is analysed asynchronously."""

    parser_classes = [NameCheckingMultiPartParser]
    required_scopes = {"POST": Scope.PATCHES_WRITE}

    @extend_schema(
        parameters=[IDEMPOTENCY],
        request={
            "multipart/form-data": inline_serializer(
                "PatchUpload", {"image": serializers.ListField(child=serializers.FileField())}
            )
        },
        responses={
            202: UPLOAD_RESULT,
            **ERRORS,
            413: OpenApiResponse(PROBLEM, description="The request is larger than the platform accepts."),
            503: OpenApiResponse(PROBLEM, description="The image store cannot be written to now; nothing was stored."),
            507: OpenApiResponse(PROBLEM, description="The image store is full; nothing was stored."),
        },
    )
    def post(self, request, pk: int):
        case = cases_visible_to(principal=request.user).filter(pk=pk).first()
        if case is None:
            raise Http404
        return idempotent(request, lambda: self._upload(request, case))

    def _upload(self, request, case: BiopsyCase) -> Response:
        files, refused = _split_refused(request)
        try:
            result = patch_upload(case=case, uploaded_by=request.user, files=files, rejected=refused)
        except NoValidImage as exc:
            return problem_response(400, str(exc), kind="no-valid-image", rejected=_rejected(exc.rejected))
        return Response(
            {
                "case": case.pk,
                "patches": [{"id": p.pk, "status": p.status, "original_name": p.original_name} for p in result.patches],
                "rejected": _rejected(result.rejected),
            },
            status=status.HTTP_202_ACCEPTED,
        )


def _rejected(rejected: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"file": name, "error": reason} for name, reason in rejected]


def _visible_patch(request, pk: int) -> TissuePatch:
    cases = cases_visible_to(principal=request.user)
    patch = (
        TissuePatch.objects.filter(pk=pk, case__in=cases)
        .select_related("case")  # for the review's blindness
        .prefetch_related(
            Prefetch("predictions", queryset=Prediction.objects.select_related("model_version").order_by("-id")),
            "reviews",
        )
        .first()
    )
    if patch is None:
        raise Http404
    return patch


class PatchDetail(APIView):
    """One patch: its status and (with the results:read scope) its AI result."""

    required_scopes = {"GET": Scope.CASES_READ}

    @extend_schema(responses={200: PatchSerializer, **ERRORS})
    def get(self, request, pk: int):
        patch = _visible_patch(request, pk)
        return Response(
            PatchSerializer(patch, context={"results": _can_read_results(request.user), "viewer": request.user}).data
        )


class PatchImage(APIView):
    """The stored patch as a lossless PNG, for the owning institution only."""

    required_scopes = {"GET": Scope.CASES_READ}

    @extend_schema(responses={(200, "image/png"): OpenApiTypes.BINARY, **ERRORS})
    def get(self, request, pk: int):
        patch = _visible_patch(request, pk)
        with default_storage.open(patch.storage_name, "rb") as handle:
            image = decode_rgb(handle.read())
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        response = HttpResponse(buffer.getvalue(), content_type="image/png")
        response["Cache-Control"] = "private, no-store"
        return response


class CaseFhir(APIView):
    """The case as an HL7 FHIR R4 Bundle: Patient, Specimen, one Observation per analysed patch, DiagnosticReport."""

    # The bundle carries the patient's demographics as well as the AI results.
    required_scopes = {"GET": (Scope.CASES_READ, Scope.RESULTS_READ)}

    @extend_schema(responses={(200, "application/fhir+json"): OpenApiTypes.OBJECT, **ERRORS})
    def get(self, request, pk: int):
        try:
            case = case_with_results(principal=request.user, case_id=pk)
        except BiopsyCase.DoesNotExist:
            raise Http404 from None
        patient_read(principal=request.user, patients=[case.patient], via="api fhir", request=request, case=case)
        return Response(case_bundle(case), content_type="application/fhir+json")
