"""The compiled parts of the media path; everything else is in pyproject.toml.

huddle/rtc/_fastpath.c: SRTP protect and the sendmmsg batch of the media port. huddle/sfu/_rewrite.c: the
StreamRewriter and a Consumer's per-packet send in one call, through _fastpath's C table (_fastpath.h).
Building them is not optional: a checkout installed with `pip install -e .` always has them, and the tests
check that the forwarding path uses them (huddle.rtc.fastpath.COMPILED says which path is in use). They need
a C compiler and Python's headers (scripts/system-deps).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "huddle.rtc._fastpath",
            ["huddle/rtc/_fastpath.c"],
            depends=["huddle/rtc/_fastpath.h"],
            extra_compile_args=["-O2", "-Wall"],
        ),
        Extension(
            "huddle.sfu._rewrite",
            ["huddle/sfu/_rewrite.c"],
            depends=["huddle/rtc/_fastpath.h"],
            extra_compile_args=["-O2", "-Wall"],
        ),
    ]
)
