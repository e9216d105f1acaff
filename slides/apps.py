from django.apps import AppConfig


class SlidesConfig(AppConfig):
    name = "slides"
    verbose_name = "Whole-slide images"

    def ready(self) -> None:
        from slides import tasks  # noqa: F401  (the receivers that send slide jobs to the workers)
