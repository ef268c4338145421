"""Settings of the example project: no database, no apps, just views."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# Read from the environment in any real deployment. The fallback is for local
# development of this example only: it is public, so never use it elsewhere.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-development-only-ptth-sync-example-key")

DEBUG = False

# The router forwards the client's Host header unchanged, and this example is
# reached through whatever name the router listens on. Restrict this to your
# real host names in production.
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = []

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"

# No models, so no database.
DATABASES = {}

USE_TZ = True
# Django sets the process's TZ to this: keep log timestamps in UTC, not Chicago time.
TIME_ZONE = "UTC"

# Django's own loggers (404s, 500s with their tracebacks) go to the root logger
# that the server configured, also with DEBUG off; by default they would only
# be mailed to ADMINS.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"django": {"level": "WARNING", "propagate": True}},
}
