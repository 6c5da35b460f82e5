"""Build the Cython hot paths (mooncakefs._engine, and mooncakefs.transfer._rdma where libibverbs' headers
are installed: Debian libibverbs-dev, which tools/install-deps.sh installs); the rest is in pyproject.toml."""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "mooncakefs._engine",
        ["mooncakefs/_engine.pyx"],
        depends=["mooncakefs/_crc32c.h", "mooncakefs/_shared_index.h", "mooncakefs/_stream_copy.h"],
        extra_compile_args=["-O3"],
    )
]

# The rdma hot path needs <infiniband/verbs.h>.  Without it the engine still works (tcp, local); say so.
if os.path.exists("/usr/include/infiniband/verbs.h") or os.environ.get("MOONCAKEFS_RDMA") == "1":
    extensions.append(
        Extension(
            "mooncakefs.transfer._rdma",
            ["mooncakefs/transfer/_rdma.pyx"],
            libraries=["ibverbs"],
            extra_compile_args=["-O3"],
        )
    )
else:
    print(
        "mooncakefs: <infiniband/verbs.h> not found (apt install libibverbs-dev): building without the rdma transport",
        file=sys.stderr,
    )

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
