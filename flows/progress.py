"""A listener hook so the CLI can draw a progress bar for flows running in the same process."""

from typing import Callable

_listeners: list[Callable[[str, dict], None]] = []


def subscribe(listener: Callable[[str, dict], None]) -> None:
    _listeners.append(listener)


def unsubscribe(listener: Callable[[str, dict], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def notify(event: str, **data) -> None:
    """Tell listeners about 'run-started', 'batch-done', 'round-done' or 'run-done'."""
    for listener in list(_listeners):
        listener(event, data)
