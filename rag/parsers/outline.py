"""The heading path at the current point of a document, as its headings go by."""

from __future__ import annotations


class Outline:
    """Tracks nested headings: after "# Install" and "## Linux" the path is (Install, Linux)."""

    def __init__(self) -> None:
        self._levels: list[tuple[int, str]] = []

    @property
    def path(self) -> tuple[str, ...]:
        """Headings that enclose the current point, outermost first."""
        return tuple(text for _, text in self._levels)

    def enter(self, level: int, text: str) -> tuple[str, ...]:
        """A heading of `level` (1 = top) starts here; returns the new path."""
        while self._levels and self._levels[-1][0] >= level:
            self._levels.pop()
        self._levels.append((level, text))
        return self.path
