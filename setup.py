import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as handle:
        return handle.read()


# Read __version__ with a regex: importing the module is not needed to package it.
VERSION = re.search(r'^__version__ = "([^"]+)"', read("saltevent.py"), re.M).group(1)

setup(
    name="saltevent",
    version=VERSION,
    description="SaltStack's event bus as one pure-stdlib Python module",
    long_description=read("README.rst"),
    long_description_content_type="text/x-rst",
    license="Apache-2.0",
    py_modules=["saltevent"],
    python_requires=">=3.8",
    entry_points={"console_scripts": ["saltevent = saltevent:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Systems Administration",
    ],
)
