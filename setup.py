"""Build the Cython packet path (ext/) into ctms_media._fast*; metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "ctms_media._fasthmac",
        ["ext/_fasthmac.pyx"],
        libraries=["crypto"],
    ),
]

setup(ext_modules=cythonize(extensions, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}))
