from django.contrib import admin

from cloudiopsy.admin_tenancy import TenantReadOnlyAdmin, TenantReadOnlyTabularInline
from slides.models import Slide, SlideChunk


class SlideChunkInline(TenantReadOnlyTabularInline):
    model = SlideChunk
    fields = ["index", "start", "stop", "status", "worker", "attempts", "tiles_done", "seconds", "finished_at"]


@admin.register(Slide)
class SlideAdmin(TenantReadOnlyAdmin):
    """Slides are written by uploads and the workers; here they are read (with each chunk's
    worker and attempts, to see where a slow or stuck analysis stands)."""

    institution_field = None
    list_display = ["original_name", "case", "status", "tiles_done", "tiles_total", "vendor", "created_at"]
    list_filter = ["status", "vendor"]
    list_select_related = ["case"]
    search_fields = ["original_name", "case__accession", "sha256"]
    inlines = [SlideChunkInline]
