"""What Python 3.9+ has and JetPack 5's Python 3.8 lacks, in one place."""

from __future__ import annotations


def removeprefix(text: str, prefix: str) -> str:
    """`str.removeprefix` (3.9+)."""
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def removesuffix(text: str, suffix: str) -> str:
    """`str.removesuffix` (3.9+)."""
    return text[: -len(suffix)] if suffix and text.endswith(suffix) else text
