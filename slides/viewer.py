"""The slide viewer: its page, Deep Zoom tiles for OpenSeadragon and the AI heatmap overlay.

Every endpoint is for signed-in users of the slide's institution: another institution's slide is
"not found" (tiles included), a lab manager gets the 403 page. Tiles are rendered by OpenSlide's
Deep Zoom generator from the stored file and kept as JPEG bytes in Django's cache (the
``slide_tiles`` cache when one is configured, else the default; shared by the web processes when
it is Redis). A slide never changes once stored, so the slide's checksum and a tile's address name
the tile for good: that is its ETag.

In the browser, tiles are patient data like the rest (``no-store``, as NoStoreMiddleware sets on
every page): a shared workstation's disk cache must not keep them. Panning back over a slide is
served from the server's cache instead; the ETag still answers a client that asks conditionally.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import threading
from collections import OrderedDict

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.cache import caches
from django.http import Http404, HttpResponse, HttpResponseNotFound
from django.shortcuts import render
from django.templatetags.static import static
from django.urls import reverse
from django.utils.cache import get_conditional_response
from django.views.decorators.http import require_safe

from cases.views import patient_data_required
from slides import storage
from slides.jobs import slide_progress
from slides.models import Slide
from slides.selectors import slide_for_viewer, slide_judgement, slides_visible_to

logger = logging.getLogger(__name__)

# Deep Zoom geometry: 254 + 2 x 1 px overlap = 256 px images, the size viewers fetch best.
TILE_SIZE, TILE_OVERLAP = 254, 1
TILE_QUALITY = 80  # JPEG quality of served tiles
TILE_CACHE_SECONDS = 3600  # in Django's cache (server side): a slide's tiles while it is being read
TILE_CACHE = "slide_tiles"  # a cache alias of its own, when settings.CACHES has one
OPEN_SLIDES = 8  # Deep Zoom generators (each holding an open OpenSlide) kept per web process
NAV_BUTTONS = ("zoomIn", "zoomOut", "home", "fullpage")
NAV_STATES = {"REST": "rest", "GROUP": "grouphover", "HOVER": "hover", "DOWN": "pressed"}


class SlideUnreadable(Exception):
    """The stored slide file cannot be opened (missing, or storage unreachable)."""


class _Generators:
    """A small least-recently-used set of Deep Zoom generators, one per slide file, shared by a
    process's threads. OpenSlide handles are safe to read from several threads at once; one that
    drops out of the set is closed when its last reader lets go of it (OpenSlide closes on GC)."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[str, object] = OrderedDict()

    def get(self, slide: Slide):
        key = f"{slide.storage_name}:{slide.sha256}"
        with self._lock:
            generator = self._items.get(key)
            if generator is not None:
                self._items.move_to_end(key)
                return generator
        # Opened outside the lock: fetching a slide from object storage may take a while, and two
        # threads opening the same file at once only cost a spare handle.
        generator = _open_generator(slide)
        with self._lock:
            generator = self._items.setdefault(key, generator)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return generator

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def _open_generator(slide: Slide):
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    try:
        path = storage.slide_local_path(slide.storage_name, slide.sha256)
        handle = openslide.OpenSlide(str(path))
    except (OSError, openslide.OpenSlideError) as exc:
        logger.error("slide %s: cannot open %s: %s", slide.pk, slide.storage_name, exc)
        raise SlideUnreadable from exc
    return DeepZoomGenerator(handle, tile_size=TILE_SIZE, overlap=TILE_OVERLAP, limit_bounds=False)


generators = _Generators(OPEN_SLIDES)


def deep_zoom_tiles(width: int, height: int) -> list[tuple[int, int]]:
    """(cols, rows) of tiles per Deep Zoom level, level 0 (1 x 1 px) first: the geometry of
    ``DeepZoomGenerator(limit_bounds=False)``, from the slide's size alone (no file opened)."""
    sizes = [(width, height)]
    while sizes[-1] != (1, 1):
        sizes.append(tuple(max(1, math.ceil(z / 2)) for z in sizes[-1]))
    return [(math.ceil(w / TILE_SIZE), math.ceil(h / TILE_SIZE)) for w, h in reversed(sizes)]


def _visible_slide(request, pk: int) -> Slide:
    try:
        return slides_visible_to(user=request.user).get(pk=pk)
    except Slide.DoesNotExist:
        # Another institution's slide is "not found", never "forbidden": no hint that it exists.
        raise Http404("No such slide.") from None


def _not_found(message: str) -> HttpResponse:
    """A 404 that says why, for the image endpoints (a viewer or a script reads it, not a person)."""
    return HttpResponseNotFound(message, content_type="text/plain; charset=utf-8")


def _unreadable() -> HttpResponse:
    return HttpResponse(
        "The slide's image cannot be read right now; try again later.", status=503, content_type="text/plain"
    )


def _cached_response(request, etag: str, make) -> HttpResponse:
    """304 when the client holds ``etag`` already, else ``make()``; never stored by the browser."""
    response = get_conditional_response(request, etag=etag) or make()
    if response.status_code in (200, 304):
        response["ETag"] = etag
        response["Cache-Control"] = "no-store, private"
    return response


def _cache():
    """Tiles are many and large: a cache of their own keeps them from evicting the rate limiter's
    counts from the default one."""
    return caches[TILE_CACHE] if TILE_CACHE in settings.CACHES else caches["default"]


def _nav_images() -> dict:
    """OpenSeadragon's button images, by their static URLs (hashed names off DEBUG)."""
    return {
        button: {
            state: static(f"slides/openseadragon/images/{button.lower()}_{suffix}.png")
            for state, suffix in NAV_STATES.items()
        }
        for button in NAV_BUTTONS
    }


@login_required
@patient_data_required
@require_safe
def slide_detail(request, pk: int):
    try:
        slide = slide_for_viewer(user=request.user, slide_id=pk)
    except Slide.DoesNotExist:
        raise Http404("No such slide.") from None
    grid = slide.grid or {}
    has_heatmap = bool(slide.status == Slide.Status.DONE and slide.results_name and grid.get("step"))
    regions = slide.region_list
    case_url = reverse("cases:detail", args=[slide.case_id])
    progress = slide_progress(slide)
    config = {
        "slideId": slide.pk,
        "dzi": reverse("slides:dzi", args=[slide.pk]),
        "api": reverse("api:slide-detail", args=[slide.pk]),
        "pending": slide.status in Slide.PENDING,
        "etaSeconds": progress["eta_seconds"],
        "width": slide.width,
        "height": slide.height,
        "navImages": _nav_images(),
        "heatmap": None,
        "regions": [
            {
                "rank": region.rank,
                "x": region.x,
                "y": region.y,
                "width": region.width,
                "height": region.height,
                "score": region.score,
                "patch": f"{case_url}#patch-{region.patch_id}" if region.patch_id else None,
            }
            for region in regions
        ],
    }
    if has_heatmap:
        # The heatmap has one pixel per grid tile: it covers cols x step by rows x step level-0 px.
        config["heatmap"] = {
            "url": reverse("slides:heatmap", args=[slide.pk]),
            "width": grid["cols"] * grid["step"],
            "height": grid["rows"] * grid["step"],
        }
    return render(
        request,
        "slides/slide_detail.html",
        {
            "slide": slide,
            "case": slide.case,
            "regions": regions,
            "judgement": slide_judgement(slide=slide),
            "viewer_config": config,
            "case_url": case_url,
        },
    )


@login_required
@patient_data_required
@require_safe
def slide_dzi(request, pk: int):
    slide = _visible_slide(request, pk)

    def make():
        try:
            xml = generators.get(slide).get_dzi("jpeg")
        except SlideUnreadable:
            return _unreadable()
        return HttpResponse(xml, content_type="application/xml")

    return _cached_response(request, f'"{slide.sha256[:32]}-dzi-{TILE_SIZE}-{TILE_OVERLAP}"', make)


@login_required
@patient_data_required
@require_safe
def slide_tile(request, pk: int, level: int, col: int, row: int):
    slide = _visible_slide(request, pk)
    levels = deep_zoom_tiles(slide.width, slide.height)
    if level >= len(levels):
        return _not_found(f"This slide has Deep Zoom levels 0 to {len(levels) - 1}.")
    cols, rows = levels[level]
    if col >= cols or row >= rows:
        return _not_found(f"Level {level} of this slide has tiles 0..{cols - 1} x 0..{rows - 1}.")

    def make():
        key = f"slides:tile:{slide.sha256}:{TILE_SIZE}:{TILE_OVERLAP}:{level}:{col}:{row}"
        data = _cache().get(key)
        if data is None:
            try:
                tile = generators.get(slide).get_tile(level, (col, row))
            except SlideUnreadable:
                return _unreadable()
            buffer = io.BytesIO()
            tile.save(buffer, format="JPEG", quality=TILE_QUALITY)
            data = buffer.getvalue()
            _cache().set(key, data, TILE_CACHE_SECONDS)
        return HttpResponse(data, content_type="image/jpeg")

    return _cached_response(request, f'"{slide.sha256[:32]}-{TILE_SIZE}-{TILE_OVERLAP}-{level}-{col}-{row}"', make)


@login_required
@patient_data_required
@require_safe
def slide_heatmap(request, pk: int):
    """The TUM heatmap, one pixel per grid tile (transparent where nothing was analysed)."""
    from inference.core.slides import heatmap_png, results_load

    slide = _visible_slide(request, pk)
    if slide.status != Slide.Status.DONE or not slide.results_name:
        return _not_found("This slide has no results yet.")
    # Results are rewritten under the same name if a slide is ever finished again: its time tells.
    finished = slide.finished_at.isoformat() if slide.finished_at else ""
    version = hashlib.sha256(f"{slide.results_name}|{finished}".encode()).hexdigest()[:16]

    def make():
        key = f"slides:heatmap:{slide.pk}:{version}"
        data = _cache().get(key)
        if data is None:
            try:
                results = results_load(storage.bytes_read(slide.results_name))
            except OSError as exc:
                logger.error("slide %s: cannot read results %s: %s", slide.pk, slide.results_name, exc)
                return _unreadable()
            if "TUM" not in results.classes:
                return _not_found("The model this slide was analysed with has no tumour (TUM) class.")
            data = heatmap_png(results, "TUM")
            _cache().set(key, data, TILE_CACHE_SECONDS)
        return HttpResponse(data, content_type="image/png")

    return _cached_response(request, f'"{slide.sha256[:32]}-heatmap-{version}"', make)
