"""The example views: the same endpoints as ``examples/flask_app.py``, plus cookies."""

import simple_websocket
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_safe


@require_safe
def foo(request):
    """``GET /foo`` → ``bar``."""
    return HttpResponse(b"bar", content_type="text/plain")


@csrf_exempt
@require_http_methods(["POST", "PUT"])
def echo(request):
    """The request body, unchanged."""
    return HttpResponse(request.body, content_type="application/octet-stream")


@require_safe
def whoami(request):
    """What Django sees of the client and of the request line."""
    return JsonResponse(
        {
            "remote_addr": request.META.get("REMOTE_ADDR"),
            "host": request.get_host(),
            "scheme": request.scheme,
            "path": request.path,
            "args": {key: request.GET.getlist(key) for key in request.GET},
        }
    )


@require_safe
def cookies(request):
    """Sets two cookies: two ``Set-Cookie`` headers in one response."""
    response = HttpResponse(b"cookies set", content_type="text/plain")
    response.set_cookie("flavour", "chocolate", httponly=True)
    response.set_cookie("size", "large", max_age=3600, samesite="Lax")
    return response


def echo_websocket(request):
    """A WebSocket that sends every message back (``ws://ROUTER/ws``), with simple-websocket.

    It takes the connection from the WSGI environ, as under gunicorn's threaded worker; the
    response returned once the WebSocket is over goes nowhere.
    """
    ws = simple_websocket.Server(request.environ)
    try:
        while True:
            ws.send(ws.receive())
    except simple_websocket.ConnectionClosed:
        pass
    return HttpResponse()
