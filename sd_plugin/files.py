"""Reading and writing the files the commands take and make.

One JSONL reader for every command (errors name file:line), one check that an output is not also an input,
and one atomic write (temporary file next to the target, fsync, rename; `open_atomic` for streamed writers) that gives the file the mode a plain
`open(path, "w")` would. The attempts log (OUTPUT.attempts.jsonl) makes `collect-revisions` and `generate`
resumable: entries are appended and fsync'd per batch, and a rerun reads back the finished ones. Bad input raises `sd_plugin.cli.UsageError`, which the CLI prints as one line and
exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_plugin.cli import UsageError

LOG = logging.getLogger("sd_plugin")
# JSON rows nested deeper than this are refused: no record of the project nests beyond a few levels, and the code that
# walks a row (fingerprints, masking, chat templates) recurses.
MAX_NESTING = 100
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


def nesting_depth(value) -> int:
    """How deep lists and dicts nest in a parsed JSON value (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            if depth + 1 <= MAX_NESTING:  # deeper is refused anyway: stop looking
                stack.extend((child, depth + 1) for child in item)
    return deepest


def loads_json(text: str):
    """`json.loads` that refuses (ValueError) a value nested deeper than MAX_NESTING instead of overflowing the
    stack here or in the code that walks the value later."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_NESTING} levels") from None
    if nesting_depth(value) > MAX_NESTING:
        raise ValueError(f"JSON nested deeper than {MAX_NESTING} levels")
    return value


def json_object(text: str) -> dict:
    """argparse type of --verifier-kwargs: a JSON object."""
    shown = text if len(text) <= 200 else text[:200] + "..."
    try:
        value = loads_json(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg} at column {error.colno}): {shown!r}") from None
    except ValueError as error:  # nested too deeply
        raise argparse.ArgumentTypeError(f"{error}: {shown!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}: {shown!r}")
    return value


def read_config_file(path: str) -> dict:
    """The YAML config at `path` for the CLI; a missing file, invalid YAML or a non-mapping raises UsageError."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text (byte {error.start + 1})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise UsageError(f"{where}: invalid YAML ({getattr(error, 'problem', None) or error})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a YAML mapping of config keys, got {type(config).__name__}")
    return config


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
                row = loads_json(line)
            except json.JSONDecodeError as error:
                message = f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"
                errors.append(RowError(str(path), line_number, message, line))
                continue
            except ValueError as error:  # nested too deeply
                errors.append(RowError(str(path), line_number, str(error), line[:200]))
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


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of an existing file or folder (links followed), None when there is none: two names of one
    file, a hard link or a symlink included, have the same identity."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return None
    return status.st_dev, status.st_ino


def existing_ancestors(path: str | os.PathLike) -> list[Path]:
    """`path` and its parents that exist, nearest first (an output and the folders above it that are already there)."""
    resolved = Path(os.path.abspath(os.path.expanduser(path)))
    return [folder for folder in [resolved, *resolved.parents] if folder.exists()]


def check_output_path(option: str, path: str | os.PathLike) -> None:
    """Raise `UsageError` unless `path` can become an output file: it is not a folder, and the folders above it
    exist or can be created (the nearest existing one is a writable folder). Nothing is created here."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder: name a file")
    nearest = next(iter(existing_ancestors(Path(os.path.abspath(path)).parent)), None)
    if nearest is None or not nearest.is_dir():
        raise UsageError(f"{option} {path}: cannot create its folder ({nearest} is not a folder)")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot create it ({nearest} is not writable)")


def refuse_output_inside_folders(option: str, path: str | os.PathLike,
                                 folders: dict[str, str | os.PathLike | None]) -> None:
    """Raise `UsageError` when output `path` is inside (or is) one of the input `folders` (option -> folder; a
    name that is not a local folder, such as a Hub id, is skipped). Compared by (device, inode) of every folder
    above the output, so symlinks, `..` and bind mounts cannot hide it: writing there can replace the model's
    config.json or tokenizer files."""
    identities = {file_identity(folder): f"{name} {folder}" for name, folder in folders.items()
                  if folder is not None and os.path.isdir(folder)}
    for folder in existing_ancestors(os.path.realpath(path)) + existing_ancestors(path):
        if file_identity(folder) in identities:
            raise UsageError(f"{option} {path} is inside the input folder {identities[file_identity(folder)]}: "
                             "writing there could replace its files; choose an output outside it")


def check_model_source(option: str, name: str | None) -> None:
    """Raise `UsageError` unless `name` is a local model folder or a Hub id: `--model /nonexistent` is one line
    before anything loads, not a traceback from transformers."""
    from sd_plugin.model_card import is_hub_id

    if name is None or os.path.isdir(name) or is_hub_id(name):
        return
    if os.path.exists(name):
        raise UsageError(f"{option} {name} is a file: expected a model folder or a Hub id (owner/name)")
    raise UsageError(f"{option} {name}: no such folder (and not a Hub id owner/name)")


def refuse_output_over_input(outputs: dict[str, str | os.PathLike | None], inputs: list[str | os.PathLike],
                             force: bool = False, input_folders: dict[str, str | os.PathLike | None] | None = None) -> None:
    """Check every output (option -> path) before anything is read or written; raise `UsageError` when

    - an output is an input file, unless `force`; or two outputs are one file (by (device, inode) when the file
      exists, so hard links and symlinks match, else by resolved path, so `./a.jsonl` and `a.jsonl` match);
    - an output is inside an input folder (`input_folders`: option -> folder, e.g. --model), even with `force`;
    - an output is a folder, or its folder cannot be created (`check_output_path`).
    """
    def identity(path) -> tuple:
        return file_identity(path) or ("path", Path(path).resolve())

    input_identities = {identity(path): str(path) for path in inputs}
    seen: dict[tuple, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        check_output_path(option, path)
        refuse_output_inside_folders(option, path, input_folders or {})
        key = identity(path)
        if key in seen:
            raise UsageError(f"{option} {path} is the same file as {seen[key]}")
        seen[key] = f"{option} {path}"
        if key in input_identities and not force:
            raise UsageError(f"{option} {path} is the input {input_identities[key]}: writing it would destroy the "
                             "input (choose another path, or --force)")


def creation_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 without the process umask's bits."""
    umask = os.umask(0o022)  # reading the umask means setting it; set it straight back
    os.umask(umask)
    return 0o666 & ~umask


# Temporary names carry the writer's process id: a later run removes those of writers that are gone (killed), never
# those of a writer still running.
TEMPORARY_MARK = ".sd-tmp-"


def temporary_prefix(path: Path) -> str:
    return f".{path.name}{TEMPORARY_MARK}{os.getpid()}-"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's) or cannot be asked: keep its files
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders left next to `path` by writers that were killed (their process is
    gone); return what was removed."""
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}{TEMPORARY_MARK}*"))
    except OSError:
        return removed
    for candidate in candidates:
        pid = candidate.name[len(f".{path.name}{TEMPORARY_MARK}"):].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        LOG.warning("removed %s, left by an interrupted run", candidate)
        removed.append(candidate)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`write_bytes_atomic` of `text` as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, fsync it and rename it over `path` only once complete.

    A crash or an error leaves the old file (or none) in place, never a partial one; the temporary file of a
    killed writer is removed by the next write of `path`. The file keeps the mode of the file it replaces, or
    gets the umask's mode when new (a bare temporary file would be 0600).
    """
    with open_atomic(path) as handle:
        handle.write(data)


@contextmanager
def open_atomic(path: str | os.PathLike):
    """A binary handle whose content replaces `path` (as `write_bytes_atomic` does) when the block ends without
    an error: for writers that stream into a file, such as `torch.save`, without holding all of it in memory."""
    with open_temporary(path) as handle:
        yield handle
    try:
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    fsync_folder(Path(path).parent)


def write_temporary(path: str | os.PathLike, data: bytes) -> Path:
    """`data` in a complete, fsync'd temporary file next to `path`, with the mode `path` will have; the caller
    renames it over `path`."""
    with open_temporary(path) as handle:
        handle.write(data)
    return Path(handle.name)


@contextmanager
def open_temporary(path: str | os.PathLike):
    """A binary handle on a temporary file next to `path` that is complete, fsync'd and has the mode `path` will
    have when the block ends, and is removed when the block fails. Stale temporaries of killed writers of `path`
    are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    mode = path.stat().st_mode & 0o7777 if path.exists() else creation_mode()
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=temporary_prefix(path), delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, mode)
    except BaseException:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
        raise


def fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (best effort: some file systems cannot fsync a folder)."""
    try:
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def write_files_atomic(files: list[tuple[str | os.PathLike, bytes]]) -> None:
    """Write files that belong together (a corpus and its summary) so that a kill never leaves a new first file
    beside an old version of a later one: every temporary is written and fsync'd first, then the old versions of
    the later files are removed, then the files are renamed into place in order. Killed in between, the first file
    is old or new and the later ones are missing or new, never stale."""
    temporaries = []
    try:
        for path, data in files:
            temporaries.append(write_temporary(path, data))
        for path, _ in files[1:]:
            Path(path).unlink(missing_ok=True)
        for folder in {Path(path).parent for path, _ in files[1:]}:
            fsync_folder(folder)
        for (path, _), temporary in zip(files, temporaries):
            os.replace(temporary, path)
    except BaseException:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        raise
    for folder in {Path(path).parent for path, _ in files}:
        fsync_folder(folder)


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
