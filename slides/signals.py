"""What the slide services announce, for ``slides.tasks`` to act on (services never import tasks).
Each is sent after commit, with ids only."""

from django.dispatch import Signal

# ``slide_id``: a slide is queued for tiling.
slide_queued = Signal()
# ``slide_id`` and ``indexes``: these chunks of the slide's tiles are queued for analysis.
slide_chunks_queued = Signal()
# ``slide_id``: every chunk has an outcome; the slide's results are to be put together.
slide_finishing = Signal()
