"""Exceptions shared across packages, kept apart to avoid import loops (and ``__main__`` twins)."""

from __future__ import annotations


class UsageError(Exception):
    """A user's mistake: reported as one line on stderr with exit code 2."""
