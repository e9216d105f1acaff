from django.urls import path

from inference import views

app_name = "inference"
urlpatterns = [
    path("drift/", views.drift_page, name="drift"),
    path("drift/<slug:group>.png", views.drift_chart, name="drift_chart"),
]
