"""Helpers for tests of the ``dhf`` command line: run it in-process, check a one-line error."""

from __future__ import annotations

from click.testing import CliRunner

from deephash_faiss.cli import main


def run(*args, ok=False):
    """Invoke ``dhf`` with ``args`` (each passed through ``str``) in a CliRunner, exceptions
    not caught; with ``ok=True`` assert exit 0. Returns the click ``Result``."""
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def one_error(r, *needles, code=None, stream="stderr"):
    """Assert a handled failure and return its ``Error:`` line.

    Exit ``code`` (``None``: any non-zero); exactly one non-blank line on ``stream``
    (``"stderr"``, or ``"output"``: stdout and stderr together) and it starts with ``Error: ``;
    no traceback; not the generic ``unexpected`` fallback; each needle in the line (any case).
    """
    if code is None:
        assert r.exit_code != 0, r.output
    else:
        assert r.exit_code == code, r.output
    text = getattr(r, stream)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    assert "Traceback" not in r.output, r.output
    assert "unexpected" not in lines[0], lines[0]  # a handled, specific error
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]
