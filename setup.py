from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="ptth_sync",
    version="0.1.0",
    description="Reverse HTTP/2 tunnels for WSGI applications, synchronous and threaded",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ptth_sync", "ptth_sync.*"]),
    python_requires=">=3.9",
    install_requires=["h2>=4.1,<5", "hyperframe>=6,<7", "gunicorn>=23"],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "trustme>=1.0",
            "flask>=2",
            "django>=4.2",
            "ruff>=0.5",
        ],
        "lint": ["ruff>=0.5"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: WWW/HTTP :: WSGI :: Server",
        "Topic :: Internet :: Proxy Servers",
    ],
)
