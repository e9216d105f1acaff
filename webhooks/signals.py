"""What the webhook services announce, for the task module to act on (services never import tasks)."""

from django.dispatch import Signal

# Sent after commit with ``delivery_ids``: these deliveries are due. webhooks.tasks sends them.
deliveries_due = Signal()
