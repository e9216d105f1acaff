"""What the case services announce, for the task modules to act on (services never import tasks)."""

from django.dispatch import Signal

# Sent after commit with ``patch_ids``: these patches are queued for analysis.
# inference.tasks sends the analysis task for them.
patches_queued = Signal()
