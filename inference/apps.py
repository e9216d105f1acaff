from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "AI analysis"

    def ready(self) -> None:
        from inference import worker  # noqa: F401 - connects the worker heartbeat signals
