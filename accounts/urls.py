from django.urls import path

from accounts import views

app_name = "accounts"

urlpatterns = [
    path("two-factor/", views.two_factor, name="two-factor"),
    path("two-factor/enrol/", views.two_factor_enrol, name="two-factor-enrol"),
    path("two-factor/recovery-codes/", views.recovery_codes_renew, name="recovery-codes"),
    path("keepalive/", views.keepalive, name="keepalive"),
]
