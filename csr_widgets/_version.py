"""The package version, in a module of its own: the root package and the checkpoint
writer both read it, and neither has to import the other (pyproject.toml reads it too)."""
__version__ = "0.2.0"
