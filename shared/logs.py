"""Logging for every service: text lines (the default) or JSON objects (``KAITEN_LOG_FORMAT=json``,
python-json-logger), one per line on stderr.

Work about one Workspace runs inside :func:`about` (the consumer runner around a handler, a reconcile
pass around its key, the watcher around an observation): every record logged inside carries the
Workspace's ``namespace``, ``name``, ``uid``, ``generation`` and the ``event_id`` being handled, and,
while a span is current, its ``trace_id`` and ``span_id`` — so a log search by Workspace or by trace
finds every line, in every service. The logger's own name is ``logger`` in JSON.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

_fields: ContextVar[dict[str, Any]] = ContextVar("kaiten_log_fields", default={})  # noqa: B039 - never mutated


class _Ref(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def uid(self) -> str: ...


@contextmanager
def about(
    workspace: _Ref | None = None, *, generation: int | None = None, event_id: str | None = None
) -> Iterator[None]:
    """Records logged inside (this task and the tasks it starts) name this Workspace and event."""
    fields = dict(_fields.get())
    if workspace is not None:
        fields.update(namespace=workspace.namespace, name=workspace.name, uid=workspace.uid)
    if generation is not None:
        fields["generation"] = generation
    if event_id is not None:
        fields["event_id"] = event_id
    token = _fields.set(fields)
    try:
        yield
    finally:
        _fields.reset(token)


def current() -> dict[str, Any]:
    """The Workspace fields records get here, with the current span's ids when there is one."""
    fields = dict(_fields.get())
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        fields["trace_id"] = trace.format_trace_id(context.trace_id)
        fields["span_id"] = trace.format_span_id(context.span_id)
    return fields


class WorkspaceLog(logging.LoggerAdapter[logging.Logger]):
    """A module's logger, about one Workspace: each message starts with its key (``[ns/name]``), what
    a reader of text logs scans for. (JSON logs carry the Workspace's fields from :func:`about`.)"""

    def __init__(self, logger: logging.Logger, workspace: _Ref) -> None:
        super().__init__(logger, {"key": f"{workspace.namespace}/{workspace.name}"})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        assert self.extra is not None
        return f"[{self.extra['key']}] {msg}", kwargs


def of(logger: logging.Logger, workspace: _Ref) -> WorkspaceLog:
    """``logs.of(log, ref).info("deployed")`` logs ``[ns/name] deployed``."""
    return WorkspaceLog(logger, workspace)


class _Context(logging.Filter):
    """Copies :func:`current` onto each record when it is made (in the logging task's context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.kaiten = current()
        return True


class _Json(JsonFormatter):
    def add_fields(
        self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record.update(getattr(record, "kaiten", {}))


def setup(service: str, level: str, fmt: str, replica: str) -> None:
    """Configure the root logger once, at start-up (``fmt``: text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    if fmt == "json":
        handler.setFormatter(
            _Json(
                "%(levelname)s %(name)s %(message)s",
                timestamp="time",  # ISO 8601, UTC
                json_ensure_ascii=False,
                rename_fields={"levelname": "level", "name": "logger"},
                static_fields={"service": service, "replica": replica},
                reserved_attrs=[*logging.LogRecord("", 0, "", 0, "", None, None).__dict__, "kaiten"],
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service}[{replica}] %(name)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
