"""The daemons' log lines keep the fields passed with ``extra=``: the text format used to drop them,
so a node said "listening" without where and "client dropped" without who or why."""

from __future__ import annotations

import json
import logging
import sys

from mooncakefs.logs import JsonFormatter, TextFormatter


def _record(msg: str, exc_info=None, **extra) -> logging.LogRecord:
    return logging.getLogger("mooncakefs.node").makeRecord(
        "mooncakefs.node", logging.INFO, __file__, 1, msg, (), exc_info, extra=extra
    )


def test_text_lines_carry_the_extra_fields_quoted_where_needed():
    line = TextFormatter().format(_record("client dropped", peer="127.0.0.1:5000", why="read timed out", n=3))
    assert line.endswith(" INFO mooncakefs.node: client dropped peer=127.0.0.1:5000 why='read timed out' n=3")


def test_a_line_without_extras_is_the_plain_line():
    assert TextFormatter().format(_record("listening")).endswith(" INFO mooncakefs.node: listening")


def test_the_traceback_follows_the_fields():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record("connection failed", exc_info=sys.exc_info(), peer="p")
    first, *rest = TextFormatter().format(record).splitlines()
    assert first.endswith("connection failed peer=p")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "RuntimeError: boom"


def test_json_lines_carry_the_same_fields():
    out = json.loads(JsonFormatter().format(_record("listening", unix="/run/x.sock", tcp="127.0.0.1:7480")))
    assert out["msg"] == "listening" and out["unix"] == "/run/x.sock" and out["tcp"] == "127.0.0.1:7480"
    assert out["logger"] == "mooncakefs.node" and out["level"] == "info"
