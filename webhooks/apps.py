from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webhooks"
    verbose_name = "Webhooks to lab systems"

    def ready(self) -> None:
        from webhooks import tasks  # noqa: F401 - sends deliveries when the services announce them due
