"""lmbatch: offline batch inference for LLMs.

The subpackages live in the repository's top-level folders (engine/, io/, flows/) and are
mapped here by setuptools' package-dir.
"""

__version__ = "0.1.0"
