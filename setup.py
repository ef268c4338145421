from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="ptth_sync",
    version="0.1.0",
    description="Reverse HTTP/2 tunnels for WSGI applications, synchronous and threaded",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ptth_sync", "ptth_sync.*"]),
    # py.typed: type checkers read the package's own annotations (PEP 561).
    package_data={"ptth_sync": ["py.typed"]},
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    # gunicorn 26.2: Unreader.take_buffered, Parser.finish_body(deadline=), util.close_graceful.
    # h2 4.1 to 4.4: the engine overrides private h2 methods (ptth_sync/engine/h2compat.py) checked
    # against these (tests/unit/test_h2compat.py); CI runs the suite on the oldest of each (gunicorn 26.2.0, h2 4.1.0).
    install_requires=["h2>=4.1,<4.5", "hyperframe>=6,<7", "gunicorn>=26.2"],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "trustme>=1.0",
            "flask>=2",
            "django>=4.2",
            "flask-sock>=0.7",
            "simple-websocket>=1.0",
            "websocket-client>=1.6",
            "websockets>=13",
            "ruff>=0.5",
        ],
        "lint": ["ruff>=0.5"],
        # Optional speed-up: gunicorn's C parser for HTTP/1.1 request heads, used by gunicorn itself
        # when installed (its http_parser setting, "auto" by default); see docs/performance.md.
        "fast": ["gunicorn_h1c>=0.4.1"],
        # The documentation site: sphinx-build -W --keep-going -b html docs docs/_build/html
        "docs": ["sphinx>=7.2,<10", "myst-parser>=3,<6", "furo>=2024.1.29"],
        # mypy, with the settings in pyproject.toml; pytest for ptth_sync.testing's fixture.
        "typecheck": ["mypy>=2.4,<2.5", "pytest>=7"],
    },
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet :: WWW/HTTP :: WSGI :: Server",
        "Topic :: Internet :: Proxy Servers",
        "Typing :: Typed",
    ],
)
