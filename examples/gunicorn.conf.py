"""gunicorn settings for serving a WSGI app through ptth_sync tunnels.

    python -m ptth_sync.router --tunnel-wait 5                      # the router, elsewhere
    gunicorn -c examples/gunicorn.conf.py examples.flask_app:app    # Flask
    cd examples/django_app && gunicorn -c ../gunicorn.conf.py mysite.wsgi:application   # Django

The routers come from the environment, which gunicorn leaves alone:
PTTH_CONNECT=HOST:PORT[,HOST:PORT...] (default 127.0.0.1:8887), PTTH_TUNNELS=N (connections
per router per worker, default 1), PTTH_TOKEN or PTTH_TOKEN_FILE (the router's token, sent in
the PTTH upgrade), PTTH_MAX_BACKOFF (the longest wait between two dials, default 5 s), PTTH_TLS=1
(dial over TLS; PTTH_CAFILE for a private CA, PTTH_CERTFILE and PTTH_KEYFILE for mutual TLS). A
router that refuses the workers, or an address that is no tunnel listener, stops gunicorn with one
line and exit status 3 (see docs/troubleshooting.md). To fix them here instead, use raw_env; it
overrides the environment:

    raw_env = ["PTTH_CONNECT=router-1.internal:8887,router-2.internal:8887"]
"""

worker_class = "ptth_sync.worker.TunnelWorker"

# gunicorn binds 127.0.0.1:8000 by default, even for this worker, and two instances on one host
# would collide there. The application is reached through the router only; an empty list binds
# nothing. (With an address, each worker answers health checks there: 200 while it has a tunnel.)
bind = []

# gunicorn >= 25.1 opens a control socket whose path is shared by all instances of one user.
control_socket_disable = True

# Each worker process keeps its own tunnel(s): the router balances over 2 x PTTH_TUNNELS tunnels.
workers = 2
# Requests each worker runs at once; also the stream limit it announces to the router.
threads = 8
# Heartbeat deadline, as for gthread: a worker whose main loop stalls this long is killed. A slow
# request is not (bound those with the router's --timeout).
timeout = 30
# On SIGTERM, SIGHUP or max_requests: refuse new requests (the router sends them elsewhere), let
# the ones in flight finish for at most this long, then close the tunnels and exit.
graceful_timeout = 30
# Recycle workers now and then, gracefully as above; the other workers serve meanwhile, and the
# router's --tunnel-wait covers the moments when no tunnel accepts (all workers draining at once).
max_requests = 10000
max_requests_jitter = 1000

accesslog = "-"
loglevel = "info"
