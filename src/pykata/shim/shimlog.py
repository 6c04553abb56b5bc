"""The shim's log: logfmt lines into the `log` FIFO containerd reads.

containerd copies whatever the shim writes to that FIFO into its own log, so
each line carries the sandbox and container it is about. Writes never block
the shim: when containerd does not keep up, lines are dropped and counted.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os

LOG_FIFO = "log"
_LEVELS = {
    logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
    logging.ERROR: "error", logging.CRITICAL: "fatal",
}


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-_./:@" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    """`time=... level=... msg=... sandbox=... container=...`, like containerd's own."""

    def __init__(self, **fields: str) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        parts = [
            f"time={_quote(when.isoformat(timespec='microseconds').replace('+00:00', 'Z'))}",
            f"level={_LEVELS.get(record.levelno, 'info')}",
            f"msg={_quote(record.getMessage())}",
        ]
        extra = dict(self.fields)
        for key in ("sandbox", "container", "exec_id"):
            value = getattr(record, key, None)
            if value:
                extra[key] = value
        parts += [f"{k}={_quote(v)}" for k, v in extra.items() if v]
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class FifoHandler(logging.Handler):
    """Writes records to a non-blocking fd; drops a record rather than wait."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            os.write(self.fd, data)
        except BlockingIOError:
            self.dropped += 1
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        super().close()


def setup(bundle: str, *, debug: bool, runtime: str) -> None:
    """Log to the bundle's `log` FIFO when containerd opened it, else nowhere."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        fd = os.open(os.path.join(bundle, LOG_FIFO), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        root.addHandler(logging.NullHandler())
        return
    handler = FifoHandler(fd)
    handler.setFormatter(LogfmtFormatter(runtime=runtime, pid=str(os.getpid())))
    root.addHandler(handler)
    # Other libraries' chatter stays out unless debugging.
    for noisy in ("asyncio", "qemu"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
