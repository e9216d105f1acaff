from django.apps import AppConfig


class CasesConfig(AppConfig):
    name = "cases"
    verbose_name = "Biopsy cases"

    def ready(self) -> None:
        from django.conf import settings
        from PIL import Image

        # Pillow's decompression-bomb guard uses this global: tie it to our upload limit
        # (uploads also treat Pillow's warning above it as an error).
        Image.MAX_IMAGE_PIXELS = settings.UPLOAD_MAX_PIXELS
