"""Structured logs: one JSON object per line on the process's real stderr, with the
current trace and span ids on every line.

Ray Serve writes its own logs (and, in replicas, may redirect sys.stderr into its
logger); the `imagegen` logger bypasses both with its own handler on fd 2, which
Ray collects into the worker's log file and, locally, echoes to the driver.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

LOGGER = "imagegen"
_lock = threading.Lock()
_configured = False


class TraceIds(logging.Filter):
    """Puts trace_id and span_id of the current span on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if not hasattr(record, "trace_id"):
            record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        if not hasattr(record, "span_id"):
            record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        return True


def formatter() -> logging.Formatter:
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}{trace_id}{span_id}",
        style="{",
        rename_fields={"asctime": "ts", "levelname": "level", "name": "logger",
                       "message": "msg"},
        timestamp=False,
        json_ensure_ascii=False,
    )


def setup_logging(level: str | None = None, stream=None) -> logging.Logger:
    """Attach the JSON handler to the `imagegen` logger (idempotent)."""
    global _configured
    logger = logging.getLogger(LOGGER)
    with _lock:
        if _configured and stream is None:
            return logger
        handler = logging.StreamHandler(stream or sys.__stderr__)
        handler.setFormatter(formatter())
        handler.addFilter(TraceIds())
        logger.handlers = [handler]
        logger.propagate = False  # Ray's root handlers would print it again
        logger.setLevel(level or os.environ.get("IMAGEGEN_LOG_LEVEL", "INFO"))
        _configured = True
    return logger
