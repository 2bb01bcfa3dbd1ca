"""The compiled part of the media port (huddle/rtc/_fastpath.c); everything else is in pyproject.toml.

Building it is not optional: a checkout installed with `pip install -e .` always has it, and the tests check
that the media port uses it (huddle.rtc.fastpath.COMPILED says which path is in use). It needs a C compiler
and Python's headers (scripts/system-deps).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "huddle.rtc._fastpath",
            ["huddle/rtc/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)
