"""Reading and writing the files the commands take and make.

One JSONL reader for every command (errors name file:line), one check that an output is not also an input,
and one atomic write (temporary file next to the target, fsync, rename; `open_atomic` for streamed writers) that gives the file the mode a plain
`open(path, "w")` would. The attempts log (OUTPUT.attempts.jsonl) makes `collect-revisions` and `generate`
resumable: entries are appended and fsync'd per batch, and a rerun reads back the finished ones. Bad input raises `sd_plugin.cli.UsageError`, which the CLI prints as one line and
exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_plugin.cli import UsageError

LOG = logging.getLogger("sd_plugin")
SHOWN_ERRORS = 5  # a list of bad or skipped rows shows this many, then "... and N more"


@dataclass(frozen=True)
class RowError:
    """A row that cannot be used, with its file and 1-based line number."""

    path: str
    line: int
    message: str
    raw: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[RowError]]:
    """Read a JSONL file into `(line_number, row)` pairs and a `RowError` for every line that is not a JSON object.

    Line numbers are 1-based; blank lines are ignored. A file that cannot be opened raises `UsageError`.
    """
    rows, errors = [], []
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror or error})") from None
    with handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a BOM is not a bad row
            except UnicodeDecodeError as error:
                errors.append(RowError(str(path), line_number, f"not UTF-8 text (byte {error.start + 1})"))
                continue
            line = line.rstrip("\r\n")  # so that an error at the end of a cut line has that line's column
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"
                errors.append(RowError(str(path), line_number, message, line))
                continue
            if not isinstance(row, dict):
                message = f"expected a JSON object, got {type(row).__name__}"
                errors.append(RowError(str(path), line_number, message, line))
                continue
            rows.append((line_number, row))
    return rows, errors


def row_error_lines(errors: list[RowError], limit: int = SHOWN_ERRORS) -> list[str]:
    """At most `limit` errors as `file:line: reason` lines, then one `... and N more` line."""
    lines = [str(error) for error in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more")
    return lines


def refuse_row_errors(errors: list[RowError], what: str = "malformed") -> None:
    """Raise `UsageError` naming the first bad row (file:line: reason) and how many there are in all."""
    if errors:
        more = f" ({len(errors)} {what} rows in all)" if len(errors) > 1 else ""
        raise UsageError(f"{errors[0]}{more}")


def read_jsonl_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """`(line_number, row)` pairs of a JSONL file; any line that is not a JSON object raises `UsageError`."""
    rows, errors = read_jsonl(path)
    refuse_row_errors(errors)
    return rows


def refuse_missing_field(rows: list[dict], field: str, option: str, source: str) -> None:
    """Raise `UsageError` when no row has `field`: a field the user named must exist (a typo would silently
    change the result)."""
    if not any(field in row for row in rows):
        present = sorted({key for row in rows for key in row})
        shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
        raise UsageError(f"{source}: no row has field {field!r} ({option}); fields present: {shown or 'none'}")


def refuse_output_over_input(outputs: dict[str, str | os.PathLike | None], inputs: list[str | os.PathLike],
                             force: bool = False) -> None:
    """Raise `UsageError` when an output (option -> path) resolves to an input file, unless `force`, or when two
    outputs resolve to the same file. Paths are compared resolved, so `./a.jsonl`, `a.jsonl` and links match."""
    resolved_inputs = {Path(path).resolve(): str(path) for path in inputs}
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise UsageError(f"{option} {path} is the same file as {seen[resolved]}")
        seen[resolved] = f"{option} {path}"
        if resolved in resolved_inputs and not force:
            raise UsageError(f"{option} {path} is the input {resolved_inputs[resolved]}: writing it would destroy the "
                             "input (choose another path, or --force)")


def creation_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 without the process umask's bits."""
    umask = os.umask(0o022)  # reading the umask means setting it; set it straight back
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`write_bytes_atomic` of `text` as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, fsync it and rename it over `path` only once complete.

    A crash or an error leaves the old file (or none) in place, never a partial one. The file keeps the mode of
    the file it replaces, or gets the umask's mode when new (a bare temporary file would be 0600).
    """
    with open_atomic(path) as handle:
        handle.write(data)


@contextmanager
def open_atomic(path: str | os.PathLike):
    """A binary handle whose content replaces `path` (as `write_bytes_atomic` does) when the block ends without
    an error: for writers that stream into a file, such as `torch.save`, without holding all of it in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else creation_mode()
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, mode)
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
        raise
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


# ------------------------------------------------------------------ the attempts log (collect-revisions, generate)
def attempts_path(output_path: str | os.PathLike) -> Path:
    """The append-only log next to the output: OUTPUT.jsonl -> OUTPUT.attempts.jsonl."""
    output = Path(output_path)
    return output.with_name(f"{output.stem}.attempts.jsonl")


def row_fingerprint(raw: dict[str, Any]) -> str:
    """A row's identity in an attempts log: a resumed run refuses a log written for other rows."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_attempts(path: Path, problems: list) -> dict[int, dict[str, Any]]:
    """The finished entries of earlier runs, by source row (`problems[row].fingerprint` must match).

    A last line without its newline (a write cut off by a crash) is removed from the file; a log written for
    other problems is an error."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete, _, unfinished = data.rpartition(b"\n")
    if unfinished:
        LOG.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted run", path, len(unfinished))
        with open(path, "r+b") as handle:
            handle.truncate(len(data) - len(unfinished))
    attempts = {}
    for number, line in enumerate(complete.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            attempt = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not valid JSON ({error}); fix or delete the log") from None
        row = attempt["source_row"]
        if row >= len(problems) or problems[row].fingerprint != attempt["fingerprint"]:
            raise ValueError(f"{path} line {number} was written for a different problem at row {row}: the problems "
                             "changed since that run; use another --output or delete the log to start over")
        attempts[row] = attempt
    return attempts


def append_attempts(path: Path, attempts: list[dict[str, Any]]) -> None:
    """Append finished entries, one line each, in one write, then fsync: a crash loses at most the batch in flight
    (a cut line is dropped on resume)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in attempts))
        handle.flush()
        os.fsync(handle.fileno())
