from django.conf import settings


def session(request) -> dict:
    """The idle limit, for the page's automatic-logoff timer."""
    return {"session_idle_timeout": settings.SESSION_IDLE_TIMEOUT}


def oidc(request) -> dict:
    """Whether the login page offers "Sign in with the hospital account"."""
    return {"oidc_enabled": settings.OIDC_ENABLED}
