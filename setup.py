"""setuptools entry point: only here so the cffi extension in native/ is built at install."""
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
