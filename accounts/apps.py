from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Institutions and accounts"

    def ready(self) -> None:
        from accounts import signals  # noqa: F401 - lockouts in the audit trail
