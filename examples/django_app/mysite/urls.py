"""URL routes of the example project."""

from django.urls import path, re_path

from . import views

urlpatterns = [
    path("foo", views.foo),
    path("echo", views.echo),
    path("whoami", views.whoami),
    # Any path below /whoami/, to show how the path arrives after percent-decoding.
    re_path(r"^whoami/", views.whoami),
    path("cookies", views.cookies),
    path("ws", views.echo_websocket),
]
