"""The one native part: merge_engine/_kernels.c and _methods.c (sharing _kernels.h). It is optional: where it cannot be compiled
(no C compiler), the package installs without it and merges take the slower torch path."""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
setup(ext_modules=[Extension(
    "merge_engine._kernels",
    ["merge_engine/_kernels.c", "merge_engine/_methods.c"],
    depends=["merge_engine/_kernels.h"],
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"] if unix else ["/O2", "/fp:precise"],
    libraries=["m"] if unix else [],
    optional=True,
)])
