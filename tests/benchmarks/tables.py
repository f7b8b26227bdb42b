"""Reading the figures a benchmark script prints."""

from __future__ import annotations

from itertools import pairwise


def table_rows(out: str, header: str) -> list[list[str]]:
    """The cells of each row of the Markdown table whose header line starts with ``header``
    (the test fails if no such table prints). Lines that do not start with ``|`` (Ray's
    worker logs reach the driver's stdout between rows) are passed over; the table ends at
    the next table's header."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert starts, f"no table headed {header!r} in:\n{out}"
    rows = []
    for line, following in pairwise([*lines[starts[0] + 2 :], ""]):
        if following.startswith("|---"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    """A table cell's figure: ``1,234``, ``0.87``, ``1.5x`` or ``2.10 GiB``."""
    return float(cell.split()[0].rstrip("x").replace(",", ""))
