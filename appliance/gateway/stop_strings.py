"""Stop strings of a stream that may move between instances. The gateway asks each instance to
keep the stop string in its output and holds back the text that could be the start of one, as
vLLM itself does: so the text of every generated token is in the gateway's hands (a move
continues after all of them, losing nothing), and a stop string that begins before a move and
ends after it is still found (each instance sees only its own output)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StopStrings:
    """The client's stop strings and the text held back from it."""

    stops: tuple[str, ...]
    include: bool
    """The client asked for the stop string in its output."""
    min_tokens: int = 0
    held: str = ""
    """Text not yet passed on: it could be the start of a stop string."""
    recent: str = ""
    """The end of the text so far, as long as the longest stop string but one."""

    @classmethod
    def of(cls, body: dict[str, Any]) -> StopStrings | None:
        stop = body.get("stop")
        stops = tuple(s for s in ([stop] if isinstance(stop, str) else stop or ()) if s)
        if not stops or not all(isinstance(s, str) for s in stops):
            return None
        return cls(
            stops, bool(body.get("include_stop_str_in_output")), int(body.get("min_tokens") or 0)
        )

    @property
    def hold(self) -> int:
        """Characters held back: the longest stop string but one (vLLM's stop buffer)."""
        return 0 if self.include else self._longest - 1

    @property
    def _longest(self) -> int:
        return max(len(s) for s in self.stops)

    def pass_on(
        self, text: str, stop_reason: Any, finishing: bool, search: bool, generated: int
    ) -> tuple[str, str | None]:
        """What the client gets of `text`, and the stop string the gateway found itself (None
        when it found none). `search`: look for stop strings that begin in the text before
        (after a move, where the instance knows only its own output); `stop_reason` is the
        instance's; `generated` counts the tokens so far (stop strings count after min_tokens)."""
        window = self.recent + text
        full = self.held + text
        found = None
        if search and generated > self.min_tokens:
            hits = [(at, s) for s in self.stops if (at := window.find(s)) >= 0]
            if hits:
                at, found = min(hits)
                end = at + len(found) - len(self.recent)  # in `text`: where the stop ends
                full, stop_reason, finishing = self.held + text[:end], found, True
        self.recent = window[len(window) - min(self._longest - 1, len(window)) :]
        if finishing:
            self.held = ""
            if not self.include and isinstance(stop_reason, str) and full.endswith(stop_reason):
                full = full[: -len(stop_reason)]
            return full, found
        keep = min(self.hold, len(full))
        self.held = full[len(full) - keep :]
        return full[: len(full) - keep], None
