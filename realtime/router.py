"""Maps topics to channel classes: exact topics (`"presence:global"`) or prefixes (`"user:*"`).

Pure: no I/O. The longest matching pattern wins, so `"feed:user:*"` can sit beside `"feed:*"`.
"""

from __future__ import annotations

from .channel import Channel


class Router:
    def __init__(self) -> None:
        self._exact: dict[str, type[Channel]] = {}
        self._prefixes: list[tuple[str, type[Channel]]] = []

    def channel(self, pattern: str, channel_class: type[Channel]) -> None:
        if pattern.endswith("*"):
            prefix = pattern[:-1]
            if "*" in prefix:
                raise ValueError(f"a wildcard may only end a topic pattern: {pattern!r}")
            self._prefixes.append((prefix, channel_class))
            self._prefixes.sort(key=lambda item: len(item[0]), reverse=True)
        else:
            if "*" in pattern:
                raise ValueError(f"a wildcard may only end a topic pattern: {pattern!r}")
            self._exact[pattern] = channel_class

    def match(self, topic: str) -> type[Channel] | None:
        found = self._exact.get(topic)
        if found is not None:
            return found
        for prefix, channel_class in self._prefixes:
            # A wildcard matches one or more characters: "user:" alone is not a user topic.
            if topic.startswith(prefix) and len(topic) > len(prefix):
                return channel_class
        return None
