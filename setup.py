"""Build the Cython packet path (ext/) into ctms_media._fast* and ctms_media._udpio;
metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# The SHA1_* calls (see ext/openssl.pxd) are deprecated in OpenSSL 3, deliberately used.
OPENSSL = {"libraries": ["crypto"], "define_macros": [("OPENSSL_SUPPRESS_DEPRECATED", None)]}

extensions = [
    Extension("ctms_media._fasthmac", ["ext/_fasthmac.pyx"], **OPENSSL),
    Extension("ctms_media._fastforward", ["ext/_fastforward.pyx"], **OPENSSL),
    Extension("ctms_media._udpio", ["ext/_udpio.pyx"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        include_path=["ext"],
        compiler_directives={"boundscheck": False, "wraparound": False},
    )
)
