from tests import apps
from tests.wsgi_client import wsgi_request


def test_get_through_one_tunnel(router, start_backend):
    start_backend(apps.hello)
    response = wsgi_request(router, "GET", "/foo")
    assert response.status == "200 OK"
    assert response.body == b"bar"
