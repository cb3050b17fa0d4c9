# The package version, read by setuptools (pyproject.toml: dynamic version)
# and re-exported as es_kernels.__version__.
__version__ = "0.1.0"
