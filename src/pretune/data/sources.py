"""Reading text sources: files, globs, directories; .txt/.md, .jsonl, .csv/.tsv, each maybe gzipped.

A gzipped file (`name.txt.gz`, `name.jsonl.gz`) is read as the format of the suffix before `.gz`.
A file with another suffix, or none (`input`, `wiki.test.raw`), is read as plain text, except the
formats that are clearly not (archives, other compressions, .json, tensors, arrays), which are refused
with the supported list.

Text is streamed in chunks, so memory does not grow with the corpus. Bytes that are not UTF-8 are
replaced with U+FFFD and counted (data.encoding_errors=replace, the default) or stop the run with the
file and byte offset (data.encoding_errors=strict). A malformed record names its file and line.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import itertools
import json
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pretune.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
RECORD_SUFFIXES = {".jsonl", ".csv", ".tsv"}
PLAIN_SUFFIXES = {".txt", ".text", ".md"}  # plain text, never task records
GZIP_SUFFIX = ".gz"
# Suffixes that are not text read as it would be: refused rather than trained on as garbage.
REFUSED_SUFFIXES = {".json": "a JSON document (write one object per line as .jsonl)",
                    ".zip": "a zip archive", ".tar": "a tar archive", ".tgz": "a tar archive",
                    ".bz2": "bzip2-compressed", ".xz": "xz-compressed", ".zst": "zstd-compressed",
                    ".7z": "a 7-zip archive", ".parquet": "Parquet", ".arrow": "Arrow",
                    ".bin": "binary", ".pt": "a PyTorch file", ".pth": "a PyTorch file",
                    ".safetensors": "a safetensors file", ".npy": "a NumPy array", ".npz": "NumPy arrays",
                    ".pkl": "a pickle", ".png": "a PNG image", ".jpg": "a JPEG image", ".jpeg": "a JPEG image",
                    ".gif": "a GIF image", ".webp": "a WebP image", ".pdf": "a PDF document (extract its text first)",
                    ".so": "a shared library", ".pyc": "compiled Python", ".exe": "a program"}
SUPPORTED = ".txt, .md, .text, .jsonl, .csv, .tsv (each also gzipped, as name.txt.gz), or plain text " \
            "under another name"
CHUNK_BYTES = 1 << 20
NUL_PROBE = 8192  # a NUL byte in a file's first 8 KiB: binary (or UTF-16), not UTF-8 text
HIDDEN_DIRS = {"__MACOSX"}  # macOS zip resource forks; dot-files and dot-folders are hidden too


class DataError(UserError, ValueError):
    """Bad input data; the message names the file (and line or byte offset)."""


def expand_source(spec: str, key: str = "data.train", records: bool = False) -> list[Path]:
    """A file, a glob or a directory (searched recursively) -> sorted list of files.

    A named file or a glob match in a refused format (see REFUSED_SUFFIXES) stops the run naming it.
    A directory takes only its files of a known format (.txt, .md, .text, .jsonl, .csv, .tsv, gzipped
    or not) and passes over the rest (a README, a LICENSE, metadata), as it always has, and over what
    is hidden below it (see _hidden): copies and metadata that tools leave there, not corpus text.
    With `records` (task records), a directory takes only its .jsonl, .csv and .tsv files: its README.md
    is passed over too (a plain-text file named on its own is still refused, by iter_records)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [_readable(p, key)]
    if p.is_dir():
        known = RECORD_SUFFIXES if records else TEXT_SUFFIXES | RECORD_SUFFIXES
        every = [f for f in p.rglob("*") if f.is_file()]
        files = sorted(f for f in every if _format(f) in known and not _hidden(f.relative_to(p)))
        if not files:
            takes = ".jsonl, .csv and .tsv task records (each also gzipped)" if records else SUPPORTED.split(', or')[0]
            raise DataError(f"{key}: directory {spec} holds no file in a known format ({len(every)} other "
                            f"file(s) passed over); a directory takes {takes}")
        return files
    matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
    if matches:
        return [_readable(m, key) for m in matches]
    raise DataError(f"{key}: {spec} does not exist (no file, directory or glob match)")


def _hidden(relative: Path) -> bool:
    """A path below a source directory that is hidden: a part that starts with "." (._a.txt, the
    AppleDouble file macOS writes beside a.txt; .git/; .ipynb_checkpoints/ with a copy of every
    notebook) or a __MACOSX/ folder of an unzipped archive. Only the parts below the directory given
    count, so a corpus that itself lives under ~/.cache is still read."""
    return any(part.startswith(".") or part in HIDDEN_DIRS for part in relative.parts)


def _compressed(path: Path) -> bool:
    return path.suffix.lower() == GZIP_SUFFIX


def _format(path: Path) -> str:
    """The suffix that says how a file is read: its own, or for name.txt.gz the one before .gz."""
    return Path(path.stem).suffix.lower() if _compressed(path) else path.suffix.lower()


def _readable(path: Path, key: str) -> Path:
    """`path` itself, or a DataError naming it and the supported formats when it is refused: a
    REFUSED_SUFFIXES format, or a gzipped file whose inner name does not say it is a known format
    (name.gz, name.raw.gz: what is inside could be anything)."""
    suffix = path.suffix.lower()
    if _compressed(path) and _format(path) not in TEXT_SUFFIXES | RECORD_SUFFIXES:
        inner = REFUSED_SUFFIXES.get(_format(path))
        what = (f"{inner}, gzipped" if inner else
                "gzipped, and its name does not say what is inside (rename it name.txt.gz or name.jsonl.gz)")
        raise DataError(f"{key}: {path} is {what}; give {SUPPORTED}")
    if suffix in REFUSED_SUFFIXES:
        raise DataError(f"{key}: {path} is {REFUSED_SUFFIXES[suffix]}, not text; give {SUPPORTED}")
    return path


def read_as(path: Path) -> str:
    """How a file's text is read: as records (".jsonl", ".csv", ".tsv") or as one document ("text").
    A gzipped file is read as the format before .gz."""
    suffix = _format(path)
    return suffix if suffix in RECORD_SUFFIXES else "text"


def _open(path: Path):
    """The file's bytes: decompressed on the fly for name.*.gz."""
    return gzip.open(path, "rb") if _compressed(path) else open(path, "rb")


def _refuse_binary(path: Path, head: bytes) -> None:
    """A DataError naming the file when its first bytes (decompressed for a .gz) hold a NUL: an image,
    an archive or UTF-16 text read as UTF-8 would be trained on as garbage, with only a warning about
    replaced bytes."""
    at = head.find(b"\x00", 0, NUL_PROBE)
    if at >= 0:
        raise DataError(f"{path}: a NUL byte at offset {at}: a binary file (or UTF-16 text), not UTF-8 text; "
                        f"remove it from the source or convert it to UTF-8; give {SUPPORTED}")


def _bad_gzip(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: not a readable gzip file ({e}); fix or recompress it, or drop the .gz suffix "
                     "if it is not compressed")


def hash_files(files: list[Path]) -> str:
    """Hash of a list of files' contents (as stored: a gzipped file's compressed bytes) and of how each
    is read (the same bytes read as JSONL and as text are different corpora, and gzipped or not);
    names are not part of it, order is."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        h.update(b"\x00file\x00" + read_as(f).encode() + (b"+gzip" if _compressed(f) else b""))
    return h.hexdigest()


@dataclass
class ReadStats:
    """What reading the text found: replaced bytes, documents, skipped empty records."""

    replaced: int = 0
    documents: int = 0
    bytes: int = 0


_replaced = [0]


def _count_and_replace(e: UnicodeDecodeError):
    _replaced[0] += 1
    return "\ufffd", e.end


codecs.register_error("pretune-count", _count_and_replace)


def _decode_stream(path: Path, errors: str, stats: ReadStats) -> Iterator[str]:
    """Yield text chunks of about CHUNK_BYTES that end at a line break where possible.

    A leading byte order mark (U+FEFF) is dropped, as for record files; byte offsets in errors still
    count it (they are offsets in the file, or in the decompressed text of a gzipped one)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict" if errors == "strict" else "pretune-count")
    where = " of the decompressed text" if _compressed(path) else ""
    offset = 0
    pending = ""
    start = True  # no text decoded yet: a BOM would be here
    with _open(path) as fh:
        while True:
            try:
                block = fh.read(CHUNK_BYTES)
            except (OSError, EOFError, zlib.error) as e:
                if not _compressed(path):
                    raise
                raise _bad_gzip(path, e) from None
            if offset == 0:
                _refuse_binary(path, block)
            final = not block
            carried = len(decoder.getstate()[0])
            before = _replaced[0]
            try:
                text = decoder.decode(block, final)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: bytes at offset {offset - carried + e.start}{where} are not valid "
                                f"UTF-8 ({e.reason}); fix the file or set data.encoding_errors=replace"
                                ) from None
            stats.replaced += _replaced[0] - before
            offset += len(block)
            stats.bytes += len(block)
            if start and text:
                text, start = text.removeprefix("\ufeff"), False
            pending += text
            if final:
                if pending:
                    yield pending
                return
            cut = pending.rfind("\n")
            if cut >= 0:
                yield pending[: cut + 1]
                pending = pending[cut + 1:]


def iter_documents(path: Path, text_field: str = "text", errors: str = "replace",
                   stats: ReadStats | None = None, field_key: str = "data.text_field") -> Iterator[tuple[str, bool]]:
    """Yield (text, ends_document) pieces. A text file is one document; a record is one document.
    `field_key` is the setting that names `text_field`, for the errors to name."""
    stats = stats if stats is not None else ReadStats()
    if read_as(path) != "text":
        for _, record in iter_records(path, errors=errors, stats=stats):
            if text_field not in record:
                raise DataError(f"{path}:{record.get('__line__', '?')}: record has no field "
                                f"{text_field!r} (fields: {', '.join(k for k in record if k != '__line__')}); "
                                f"set {field_key}")
            value = record[text_field]
            if value is None or value == "":
                continue
            if not isinstance(value, str):  # its Python repr is not the text anyone meant
                raise DataError(f"{path}:{record.get('__line__', '?')}: field {text_field!r} holds "
                                f"{type(value).__name__}, expected text (a JSON string); fix the record "
                                f"or set {field_key} to the field that holds the text")
            stats.documents += 1
            yield value, True
        return
    last = None
    for chunk in _decode_stream(path, errors, stats):
        if last is not None:
            yield last, False
        last = chunk
    if last is not None:
        stats.documents += 1
        yield last, True


def iter_records(path: Path, errors: str = "replace", stats: ReadStats | None = None,
                 on_error: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from JSONL, CSV or TSV; a malformed line names file and line.

    The file is streamed line by line (memory holds one record, not the file). A malformed record
    (invalid JSON, a JSON value that is not an object, a CSV row with more fields than the header or
    a quoted field that is never closed) raises DataError, or, when `on_error` is given, is handed to
    it and reading goes on with the next record (the callback may raise to stop). A record's line is
    the line where it starts (a quoted CSV field may hold line breaks). JSONL lines end at a line
    feed (or CR LF) only: U+2028, U+2029 and U+0085 are valid inside a JSON string.

    A gzipped file is read as the format before .gz. A file named neither .csv nor .tsv (such as
    SMSSpamCollection) is read as TSV when its header line holds a tab, else as CSV. TSV has no
    quoting (IANA text/tab-separated-values, as GLUE and the SMS Spam Collection write it): a field
    that starts with a quote keeps it, and cannot swallow the lines that follow."""
    if _format(path) in PLAIN_SUFFIXES:  # its first line would be taken for a CSV header
        raise DataError(f"{path}: task records come as JSONL, CSV or TSV, not plain text ({_format(path)}); "
                        "for the loss and bits per byte of plain text use task=lm (pretune evaluate) or "
                        "pretune pretrain")
    stats = stats if stats is not None else ReadStats()
    lines = _text_lines(path, errors, stats)
    rows = _jsonl_rows(path, lines) if _format(path) == ".jsonl" else _table_rows(path, lines)
    for line, row in rows:
        if isinstance(row, DataError):
            if on_error is None:
                raise row
            on_error(row)
            continue
        yield line, row


def _byte_lines(path: Path) -> Iterator[bytes]:
    """The file's bytes (decompressed if gzipped) line by line, each with its line feed (the last
    one maybe without); a NUL in the first bytes refuses the file (_refuse_binary)."""
    try:
        with _open(path) as fh:
            _refuse_binary(path, fh.read(NUL_PROBE))
            fh.seek(0)
            yield from fh
    except (OSError, EOFError, zlib.error) as e:
        if not _compressed(path):
            raise
        raise _bad_gzip(path, e) from None


def _text_lines(path: Path, errors: str, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """(line number, text) per line of a record file, decoded on its own (a UTF-8 sequence never
    spans a line feed, so this is the file's decoding), without a leading BOM; bad UTF-8 as
    data.encoding_errors says: replaced and counted, or a DataError naming line and byte offset."""
    offset = 0
    for number, raw in enumerate(_byte_lines(path), 1):
        stats.bytes += len(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if errors == "strict":
                where = " of the decompressed text" if _compressed(path) else ""
                raise DataError(f"{path}:{number}: bytes at offset {offset + e.start}{where} are not valid UTF-8; "
                                "fix the file or set data.encoding_errors=replace") from None
            before = _replaced[0]
            text = raw.decode("utf-8", errors="pretune-count")
            stats.replaced += _replaced[0] - before
        offset += len(raw)
        yield number, text.removeprefix("\ufeff") if number == 1 else text


def _jsonl_rows(path: Path, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, dict | DataError]]:
    """(line, record) per non-blank line, or (line, DataError) for a line that is not a JSON object."""
    for i, line in lines:
        line = line.removesuffix("\n").removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            yield i, DataError(f"{path}:{i}: expected a JSON object, got {type(record).__name__}")
            continue
        record.setdefault("__line__", i)
        yield i, record


_LONE_CR = re.compile(r"(?<=\r)(?!\n)")


def _csv_lines(lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    """The lines as the csv module reads a file opened with newline="": a lone CR ends a line too."""
    for _, line in lines:
        yield from (_LONE_CR.split(line) if "\r" in line else (line,))


def _table_rows(path: Path, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, dict | DataError]]:
    """(line, row) per CSV/TSV row, or (line, DataError) for a row with more fields than the header or
    a CSV record the csv module refuses (strict: a quoted field never closed, text after a closing
    quote). The line is where the row starts."""
    csv.field_size_limit(sys.maxsize)
    suffix = _format(path)
    text = _csv_lines(lines)
    first = next(text, None)
    if first is None:
        return
    tabs = suffix == ".tsv" or (suffix != ".csv" and "\t" in first.partition("\n")[0])
    reader = csv.reader(itertools.chain([first], text), delimiter="\t" if tabs else ",",
                        quoting=csv.QUOTE_NONE if tabs else csv.QUOTE_MINIMAL, strict=True)
    header = None
    while True:
        start = reader.line_num + 1  # the row's first line: what reader.line_num says once it is read is its last
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, DataError(_csv_problem(path, start, str(e), reader.line_num))
            continue
        if not row:  # a blank line
            continue
        if header is None:
            header = row
            continue
        if len(row) > len(header):
            yield start, DataError(f"{path}:{start}: more fields than the header "
                                   f"({len(header)} columns: {', '.join(header)})")
            continue
        record = dict(zip(header, row + [None] * (len(header) - len(row))))
        record["__line__"] = start
        yield start, record


def _csv_problem(path: Path, start: int, reason: str, end: int) -> str:
    """The message of a CSV record the csv module refuses, naming the line where it starts."""
    if "unexpected end of data" in reason:
        return (f"{path}:{start}: a quoted field of the record that starts here is never closed (it runs to the end "
                f"of the file, line {end}); close the quote, or write a quote inside a quoted field as two (\"\")")
    return (f"{path}:{start}: malformed CSV record ({reason}); a field with a quote in it must be quoted whole, "
            "its quotes doubled (\"say \"\"hi\"\"\")")
