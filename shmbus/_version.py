"""The one place shmbus's version is written (pyproject reads it, ``shmbus.__version__`` shows it)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
