"""The dd2 version (its own module so that any part of dd2 can name it without importing the package face)."""

__version__ = "0.1.0"
