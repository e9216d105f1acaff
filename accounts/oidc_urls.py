"""/oidc/: start a sign-in at the hospital's identity provider, its callback, and logout.

Every view answers 404 while ``OIDC_ENABLED`` is off. The check comes before the view is made:
mozilla-django-oidc's views read their endpoint settings when they are instantiated.
"""

from __future__ import annotations

from functools import wraps

from django.conf import settings
from django.http import Http404
from django.urls import path
from mozilla_django_oidc.views import OIDCAuthenticationRequestView

from accounts.oidc import HospitalOIDCCallbackView, HospitalOIDCLogoutView


def _only_when_enabled(view_class):
    view = view_class.as_view()

    @wraps(view)
    def guarded(request, *args, **kwargs):
        if not settings.OIDC_ENABLED:
            raise Http404("Sign-in through the hospital's identity provider is not enabled.")
        return view(request, *args, **kwargs)

    return guarded


# The names are mozilla-django-oidc's: it reverses "oidc_authentication_callback" for the redirect URI.
urlpatterns = [
    path("authenticate/", _only_when_enabled(OIDCAuthenticationRequestView), name="oidc_authentication_init"),
    path("callback/", _only_when_enabled(HospitalOIDCCallbackView), name="oidc_authentication_callback"),
    path("logout/", _only_when_enabled(HospitalOIDCLogoutView), name="oidc_logout"),
]
