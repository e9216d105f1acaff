from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "AI analysis"

    def ready(self) -> None:
        from inference import (
            tasks,  # noqa: F401 - sends the analysis task when patches are queued
            worker,  # noqa: F401 - connects the worker heartbeat signals
        )
