"""REST API for lab systems (and signed-in staff): cases and patches under /api/v1/."""

from __future__ import annotations

import secrets

from django.http import Http404
from django.http.multipartparser import MultiPartParser as DjangoMultiPartParser
from rest_framework import generics, serializers, status
from rest_framework.parsers import DataAndFiles, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import institution_of
from cases.models import BiopsyCase, Patient, TissuePatch
from cases.selectors import case_with_results, cases_visible_to
from cases.services import NoValidImage, PatientData, case_create, patch_upload
from cases.uploads import UploadRejected, check_file_name, read_uploads


class PatientSerializer(serializers.ModelSerializer):
    mrn = serializers.CharField(max_length=64)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")

    class Meta:
        model = Patient
        fields = ["mrn", "name", "birth_date", "sex"]


class PredictionField(serializers.Field):
    def to_representation(self, patch: TissuePatch):
        prediction = next(iter(patch.predictions.all()), None)  # newest first (prefetched)
        if prediction is None:
            return None
        return {
            "label": prediction.label,
            "scores": prediction.scores,
            "uncertainty": prediction.uncertainty,
            "needs_attention": prediction.needs_attention,
            "model_version": str(prediction.model_version),
            "created_at": prediction.created_at.isoformat(),
        }


class PatchSerializer(serializers.ModelSerializer):
    prediction = PredictionField(source="*", read_only=True)

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
        ]


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


class CaseDetailSerializer(CaseSerializer):
    patches = PatchSerializer(many=True, read_only=True)

    class Meta(CaseSerializer.Meta):
        fields = [*CaseSerializer.Meta.fields, "patches"]


class CaseListCreate(generics.ListCreateAPIView):
    serializer_class = CaseSerializer

    def get_queryset(self):
        return cases_visible_to(principal=self.request.user).order_by("-created_at", "-id")

    def create(self, request, *args, **kwargs):
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
        return Response(CaseSerializer(case).data, status=status.HTTP_201_CREATED)


class CaseDetail(APIView):
    def get(self, request, pk: int):
        try:
            case = case_with_results(principal=request.user, case_id=pk)
        except BiopsyCase.DoesNotExist:
            raise Http404 from None
        return Response(CaseDetailSerializer(case).data)


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


class CasePatchUpload(APIView):
    parser_classes = [NameCheckingMultiPartParser]

    def post(self, request, pk: int):
        case = cases_visible_to(principal=request.user).filter(pk=pk).first()
        if case is None:
            raise Http404
        files, refused = _split_refused(request)
        try:
            result = patch_upload(
                case=case,
                uploaded_by=request.user,
                files=files,
                rejected=refused,
            )
        except NoValidImage as exc:
            return Response({"detail": str(exc), "rejected": _rejected(exc.rejected)}, status=400)
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
