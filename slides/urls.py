from django.urls import path

from slides import viewer

app_name = "slides"
urlpatterns = [
    path("<int:pk>/", viewer.slide_detail, name="detail"),
    # OpenSeadragon finds the tiles next to the .dzi: slide_files/<level>/<col>_<row>.jpeg
    path("<int:pk>/slide.dzi", viewer.slide_dzi, name="dzi"),
    path("<int:pk>/slide_files/<int:level>/<int:col>_<int:row>.jpeg", viewer.slide_tile, name="tile"),
    path("<int:pk>/heatmap.png", viewer.slide_heatmap, name="heatmap"),
]
