from django.urls import path

from cases import views

app_name = "cases"
urlpatterns = [
    path("", views.case_list, name="list"),
    path("new/", views.case_create_view, name="create"),
    path("<int:pk>/", views.case_detail, name="detail"),
    path("<int:pk>/upload/", views.case_upload, name="upload"),
    path("<int:pk>/patches/<int:patch_id>/image/", views.patch_image, name="patch_image"),
    path("<int:pk>/patches/<int:patch_id>/heatmap/<str:label>/", views.patch_heatmap, name="patch_heatmap"),
]
