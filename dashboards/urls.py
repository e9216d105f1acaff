from django.urls import path

from dashboards import views

app_name = "dashboards"
urlpatterns = [
    path("", views.index, name="index"),
    path("<slug:dashboard>/", views.page, name="page"),
    path("<slug:dashboard>/chart.png", views.chart, name="chart"),
    path("<slug:dashboard>/<slug:table>.csv", views.table_csv, name="csv"),
]
