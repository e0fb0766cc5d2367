"""Training logs and tracebacks → findings (out-of-memory with its phase, block index, device mismatch, …);
the rules that recognise each failure live in diagnose_rules.

The log is streamed in blocks of whole lines (BLOCK_BYTES), so a 1 GB log or a binary file costs a
few MiB: one block, the frames of the current traceback and one record per distinct event. A block
with no trigger word and no traceback is only counted. Bytes that are not UTF-8 are replaced, never
fatal; torchrun's `[rank0]: ` prefix is ignored.
"""
from __future__ import annotations

import re
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from crepa_mem.doctor.findings import Context, Finding
from crepa_mem.doctor.phases import short_frames
from crepa_mem.doctor.rules import (OFFLOAD, RAISE, WSL, Event, attach_frames, detect_events, has_trigger,
                                    is_wrapper_error, looks_like_exception, oom_complete, oom_numbers)
from crepa_mem.errors import CrepaConfigError

MAX_LINE_BYTES = 64 * 1024
"""Lines are matched up to this many characters; reads never take more than this past a block."""
MAX_EVENTS = 200
"""Distinct events kept; repeats of a kept event only increment its count."""
_PROBE = 64 * 1024  # bytes at the start that decide whether the input is text

_RANK_PREFIX = re.compile(r"^\s*\[(?:rank|default)\d+\]:\s?")
_TB_START = re.compile(r"Traceback \(most recent call last\)")  # rich prints it without the colon
_FRAMES = (re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+),? in (?P<func>\S+)'),  # faulthandler: no comma
           re.compile(r"File (?P<file>\S+\.py):(?P<line>\d+), in (?P<func>\w+)"),  # IPython / Jupyter
           re.compile(r"│\s*(?P<file>[^\s│]+\.py):(?P<line>\d+) in (?P<func>\w+)"))  # rich
_CARETS = re.compile(r"^\s*[\^~]+\s*$")
_BOX = ("│", "╭", "╰", "─", "┃")  # rich's traceback box
_OOM_PART = re.compile(r"\d ?(?:[KMGT]i?B|bytes)\b|PyTorch|memory|allocat|reserved|capacity|PYTORCH_|Process \d+"
                       r"|fragmentation|\bfree\b")  # what the lines of a wrapped OOM message are made of
ORPHAN_BEFORE = 60
"""Frames printed without an exception line after them belong to the error up to this many lines before them,"""
ORPHAN_AFTER = 12
"""… else to the first error at most this many lines after them."""


def _frame(text: str):
    if "File" not in text and "│" not in text:
        return None  # most lines: no regex at all
    for rx in _FRAMES:
        if m := rx.search(text):
            return m
    return None

# ---------------------------------------------------------------------------- reading

@dataclass
class LogScan:
    """What one pass over a log found; small whatever the log's size."""

    source: str
    lines: int = 0
    bytes: int = 0
    binary: bool = False
    events: dict[tuple, Event] = field(default_factory=dict)
    unrecognized: Event | None = None
    unrecognized_count: int = 0
    offload: bool = False
    """The log shows offload (RamTorch, block swap, cpu_offload) somewhere."""
    wsl: bool = False

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "lines": self.lines, "bytes": self.bytes, "binary": self.binary,
                "events": sum(e.count for e in self.events.values())}


BLOCK_BYTES = 1 << 20
"""Reads go by blocks of whole lines this big; a block with no trigger word and no traceback in it
is only counted (a 1 GB log of progress bars is skimmed at memory-copy speed)."""


def _raw_blocks(source: Any) -> Iterator[bytes]:
    """Blocks of whole lines (a line longer than MAX_LINE_BYTES may be cut) from any accepted source."""
    if isinstance(source, (str, Path)) and str(source) == "-":
        if sys.stdin is None or sys.stdin.closed:  # `doctor --log - <&-`
            raise CrepaConfigError("--log", "-", valid="a log on standard input, which is closed here")
        yield from _stream_blocks(getattr(sys.stdin, "buffer", sys.stdin))
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory (--log wants a file)", str(path))
        with path.open("rb") as f:
            yield from _stream_blocks(f)
    elif hasattr(source, "read"):
        yield from _stream_blocks(source)
    else:  # an iterable of lines (str or bytes): grouped into UTF-8 blocks, each line capped
        group: list = []
        size = 0
        for line in source:
            if isinstance(line, str):
                line = line.encode("utf-8", "replace")
            line = line if len(line) <= MAX_LINE_BYTES else line[:MAX_LINE_BYTES]
            group.append(line if line.endswith(b"\n") else line + b"\n")
            size += len(line)
            if size >= BLOCK_BYTES:
                yield b"".join(group)
                group, size = [], 0
        if group:
            yield b"".join(group)


def _stream_blocks(stream: Any) -> Iterator[bytes]:
    while block := stream.read(BLOCK_BYTES):
        tail = stream.readline(MAX_LINE_BYTES)  # finish the line the block cut
        block = block + tail if tail else block
        yield block.encode("utf-8", "replace") if isinstance(block, str) else block  # text streams too


def iter_log_blocks(source: Any, scan: LogScan | None = None) -> Iterator[bytes]:
    """Blocks of whole lines as bytes (searching bytes is several times faster than str); counts bytes
    into `scan` and flags binary input (NUL bytes, or more than 10 % undecodable bytes, in the first 64 KiB)."""
    scan = scan if scan is not None else LogScan("<lines>")
    probed = False
    for raw in _raw_blocks(source):
        scan.bytes += len(raw)
        if not probed:
            head = _decode(raw[:_PROBE])
            scan.binary = "\x00" in head or head.count("\ufffd") > 0.1 * max(len(head), 1)
            probed = True
        yield raw


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _count_lines(raw: bytes) -> int:
    return raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)


def _split(block: str) -> list[str]:
    """Lines of a decoded block, without newline or CR; a line is cut at MAX_LINE_BYTES characters for
    matching (blocks already bound it: a longer line continues as the next line)."""
    lines = block.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:MAX_LINE_BYTES].rstrip("\r") for line in lines]


def iter_log_lines(source: Any, scan: LogScan | None = None) -> Iterator[str]:
    """Decoded lines (no newline) of a path, '-', a stream or an iterable of lines; counted into `scan`."""
    for raw in iter_log_blocks(source, scan):
        lines = _split(_decode(raw))
        if scan is not None:
            scan.lines += len(lines)
        yield from lines


class _Scanner:
    """Walks lines keeping only the current traceback's frames (innermost last). Frames without a
    `Traceback (most recent call last):` header start a traceback too; when no exception line ends
    them they are tied to the nearest error (ComfyUI's report, forum pastes)."""

    def __init__(self, scan: LogScan):
        self.scan = scan
        self.frames: deque[tuple[str, str, str]] = deque(maxlen=64)  # (file, func, source line)
        self.in_traceback = self.expect_source = self.more_source = self.headerless = False
        self.frames_start = 0
        self.pending: Event | None = None  # an exception line no rule knows (yet)
        self.open_oom: tuple[Event, str, int] | None = None  # a wrapped OOM message: (event, text so far, lines left)
        self.unframed: tuple[Event, int] | None = None  # the last error without frames, and its line
        self.orphan: tuple[tuple, int] | None = None  # frames no error claimed yet, and the line they ended

    def feed(self, no: int, line: str) -> None:
        text = _RANK_PREFIX.sub("", line, count=1)
        self._flags(text)
        if self.open_oom and self._continue_oom(text):
            return
        if "Traceback" in text and _TB_START.search(text) and not RAISE.match(text):
            self._start(no, headerless=False)
            return
        if frame := _frame(text):
            if not self.in_traceback:
                self._start(no, headerless=True)
            self.frames.append((frame["file"], frame["func"], ""))
            self.expect_source, self.more_source = True, False
            return
        if self.in_traceback and (text[:1].isspace() or text.lstrip()[:1] in _BOX):
            if (self.expect_source or self.more_source) and not _CARETS.match(text) and text.lstrip()[:1] not in _BOX:
                self._source(text)  # Python ≥ 3.13 prints every line of a multi-line statement
                self.more_source = True
            self.expect_source = False
            return
        if not text.strip():
            self.expect_source = self.more_source = False
            return
        if self.in_traceback and self.expect_source and not looks_like_exception(text) and not detect_events(text):
            self._source(text)  # a source line that lost its indentation in a paste
            self.expect_source = False
            return
        self.expect_source = self.more_source = False
        exception_line = self.in_traceback
        if exception_line and self.headerless and not looks_like_exception(text) \
                and not detect_events(text, tuple(self.frames), exception_line=True):
            self._orphan(no)  # frames without an exception line: not this line's
            exception_line = False
        self.in_traceback = False
        frames = tuple(self.frames) if exception_line else ()
        found = detect_events(text, frames, exception_line=exception_line)
        for event in found:
            event.line_no = no
            self._add(event)
            if event.code == "oom" and not oom_complete(text):
                self.open_oom = (self.scan.events.get(event.key, event), text, 6)
        if found:
            self.pending = None  # the message that explains the exception line follows it
        elif self.pending and no - self.pending.line_no > 5:
            self._flush()
        if exception_line and not found and not is_wrapper_error(text):
            self._flush()
            self.pending = Event("unrecognized_error", {"exception": text.strip()[:400]}, line_no=no,
                                 frames=short_frames(frames))

    def _start(self, no: int, *, headerless: bool) -> None:
        if self.in_traceback and self.headerless and self.frames:
            self._orphan(no)
        self.frames.clear()
        self.in_traceback, self.expect_source, self.headerless, self.frames_start = True, False, headerless, no

    def _source(self, text: str) -> None:
        file, func, src = self.frames[-1]
        self.frames[-1] = (file, func, f"{src} {text.strip()}".strip()[:300])

    def _flags(self, text: str) -> None:
        if self.scan.offload and self.scan.wsl:
            return
        lowered = text.lower()
        if not self.scan.offload and any(w in lowered for w in ("ramtorch", "offload", "swap")):
            self.scan.offload = bool(OFFLOAD.search(text))
        if not self.scan.wsl and any(w in lowered for w in ("wsl", "microsoft", "/mnt/")):
            self.scan.wsl = bool(WSL.search(text))

    def _orphan(self, no: int) -> None:
        """Frames that ended without an exception line: the error just before them, else the next one."""
        frames = tuple(self.frames)
        self.in_traceback = False
        if not frames:
            return
        if self.unframed and self.frames_start - self.unframed[1] <= ORPHAN_BEFORE:
            attach_frames(self.unframed[0], frames)
            self.unframed = None
        else:
            self.orphan = (frames, no)

    def _continue_oom(self, text: str) -> bool:
        """Joins a line to a wrapped OOM message; False (and the message is closed) when it is not one."""
        event, joined, left = self.open_oom
        self.open_oom = None
        if not text.strip() or left == 0 or _TB_START.search(text) or has_trigger(text.lower()) or _frame(text) \
                or not _OOM_PART.search(text):
            return False
        joined = f"{joined} {text.strip()}"
        event.data.update({k: v for k, v in oom_numbers(joined).items() if k != "wording" or v != "bare"})
        if not oom_complete(joined):
            self.open_oom = (event, joined, left - 1)
        return True

    def _add(self, event: Event) -> None:
        old = self.scan.events.get(event.key)
        if old is None:
            if len(self.scan.events) >= MAX_EVENTS:
                return
            self.scan.events[event.key] = old = event
        else:
            old.count += 1
            if (old.data.get("phase") == "unknown" and event.data.get("phase", "unknown") != "unknown") \
                    or (event.frames and not old.frames):
                old.data.update(event.data)  # a traceback named the phase that a bare log line did not
                old.frames = event.frames
        if event.frames:
            return
        if self.orphan and event.line_no - self.orphan[1] <= ORPHAN_AFTER and not old.frames:
            attach_frames(old, self.orphan[0])
            self.orphan = None
        elif not old.frames:
            self.unframed = (old, event.line_no)

    def _flush(self) -> None:
        if self.pending:
            self.scan.unrecognized = self.pending
            self.scan.unrecognized_count += 1
            self.pending = None


def scan_log(source: Any) -> LogScan:
    """One streaming pass over a log: a path, '-' (stdin), a stream or an iterable of lines.
    Memory: one block (BLOCK_BYTES) plus the current traceback's frames, whatever the log's size."""
    name = "<stdin>" if str(source) == "-" else (str(source) if isinstance(source, (str, Path))
                                                 else str(getattr(source, "name", "<lines>")))
    scan = LogScan(name)
    scanner = _Scanner(scan)
    for raw in iter_log_blocks(source, scan):
        quiet = not scanner.in_traceback and not scanner.open_oom and b"Traceback (most recent" not in raw \
            and b'File "' not in raw
        if quiet and not has_trigger(raw.lower()):
            scan.lines += _count_lines(raw)  # nothing a rule could match: count the lines and move on
            continue
        for line in _split(_decode(raw)):
            scan.lines += 1
            scanner.feed(scan.lines, line)
    if scanner.in_traceback and scanner.headerless:
        scanner._orphan(scan.lines)
    scanner._flush()
    return scan


def findings_from_scan(scan: LogScan, ctx: Context) -> list[Finding]:
    """Findings with fixes for what a scan found, plus one note for an empty, binary or clean log."""
    from crepa_mem.doctor.fixes import finding_for_event, log_notes

    findings: list[Finding] = []
    for event in scan.events.values():
        if event.code in ("oom", "device_mismatch"):  # what the fix may assume about the run
            event.data.update(offload_in_log=scan.offload, wsl=scan.wsl)
        findings.extend(finding_for_event(event, ctx))
    return findings + log_notes(scan)
