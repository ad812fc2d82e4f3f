"""Root URLs: the admin plus the catalogue at the site root."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("catalogue.urls")),
]
