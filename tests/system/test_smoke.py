import urllib.request


def test_router_and_backend_processes(router_process, backend_process):
    router = router_process()
    backend_process("tests.apps:hello", router.tunnel_address)
    router.wait_tunnels(1)
    with urllib.request.urlopen(router.url + "/foo", timeout=10) as response:
        assert response.read() == b"bar"
