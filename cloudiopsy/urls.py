from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from accounts import views as accounts_views
from cases import api as cases_api
from cloudiopsy.health import healthz
from cloudiopsy.metrics import metrics_view
from slides import api as slides_api

api_v1 = [
    path("cases/", cases_api.CaseListCreate.as_view(), name="case-list"),
    path("cases/<int:pk>/", cases_api.CaseDetail.as_view(), name="case-detail"),
    path("cases/<int:pk>/patches/", cases_api.CasePatchUpload.as_view(), name="case-patches"),
    path("cases/<int:pk>/fhir/", cases_api.CaseFhir.as_view(), name="case-fhir"),
    path("cases/<int:pk>/slides/", slides_api.CaseSlides.as_view(), name="case-slides"),
    path("slide-uploads/<uuid:pk>/", slides_api.SlideUploadDetail.as_view(), name="slide-upload"),
    path("slides/<int:pk>/", slides_api.SlideDetail.as_view(), name="slide-detail"),
    path("patches/<int:pk>/", cases_api.PatchDetail.as_view(), name="patch-detail"),
    path("patches/<int:pk>/image/", cases_api.PatchImage.as_view(), name="patch-image"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerSplitView.as_view(url_name="api:schema"), name="docs"),
]

urlpatterns = [
    path("", accounts_views.home, name="home"),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("account/", include("accounts.urls")),
    path("oidc/", include("accounts.oidc_urls")),
    # One way in: lockout, the second factor and the identity provider live on one login page.
    path("admin/login/", accounts_views.admin_login),
    path("cases/", include("cases.urls")),
    path("monitoring/", include("inference.urls")),
    path("dashboards/", include("dashboards.urls")),
    path("slides/", include("slides.urls")),
    path("api/v1/", include((api_v1, "api"), namespace="api")),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
]

handler400 = "cloudiopsy.api.bad_request"
handler403 = "cloudiopsy.api.permission_denied"
handler404 = "cloudiopsy.api.not_found"
handler500 = "cloudiopsy.api.server_error"
