from django.urls import path

from cases import views
from slides import pages as slide_pages

app_name = "cases"
urlpatterns = [
    path("", views.case_list, name="list"),
    path("new/", views.case_create_view, name="create"),
    path("worklist/", views.case_worklist, name="worklist"),
    path("agreement/", views.agreement, name="agreement"),
    path("agreement/chart.png", views.agreement_chart, name="agreement_chart"),
    path("<int:pk>/assign/", views.case_assign_view, name="assign"),
    path("<int:pk>/", views.case_detail, name="detail"),
    path("<int:pk>/upload/", views.case_upload, name="upload"),
    path("<int:pk>/slides/upload/", slide_pages.case_slide_upload, name="slide_upload"),
    path("<int:pk>/patches/<int:patch_id>/image/", views.patch_image, name="patch_image"),
    path("<int:pk>/patches/<int:patch_id>/heatmap/<str:label>/", views.patch_heatmap, name="patch_heatmap"),
    path("<int:pk>/patches/<int:patch_id>/review/", views.patch_review, name="patch_review"),
    path("<int:pk>/confirm-all/", views.case_confirm_all, name="confirm_all"),
    path("<int:pk>/second-read/", views.case_second_read, name="second_read"),
    path("<int:pk>/sign-out/", views.case_sign_out_view, name="sign_out"),
    path("<int:pk>/addenda/", views.case_addendum, name="addendum"),
]
