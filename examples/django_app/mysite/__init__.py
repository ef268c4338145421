"""A minimal Django project to serve through a tunnel.

    cd examples/django_app
    python -m ptth_sync.backend --connect 127.0.0.1:8887 mysite.wsgi:application
"""
