"""Progress of waited jobs: a bar per disk on a terminal, plain lines
otherwise. Observers are called from the waiting threads."""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ..api import JobInfo


class Speed:
    """MiB/s and time left per disk, from the progress seen since the
    first report (MiB/s only where the job counts bytes)."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[float, int]] = {}

    def __call__(self, disk: str, info: JobInfo) -> str:
        now = time.monotonic()
        since, start = self._first.setdefault(disk, (now, info.cur))
        elapsed, done = now - since, info.cur - start
        if elapsed < 0.5 or done <= 0:
            return ""
        rate = done / elapsed
        left = max(info.end - info.cur, 0) / rate
        speed = f"{rate / 2**20:.1f} MiB/s  " if info.in_bytes else ""
        return f"{speed}ETA {int(left) // 60}:{int(left) % 60:02d}"


class LineProgress:
    """One readable line when a disk's progress moved by ``step`` percent."""

    def __init__(self, stream: TextIO = sys.stderr, step: float = 10.0) -> None:
        self.stream = stream
        self.step = step
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._speed = Speed()

    def __call__(self, disk: str, info: JobInfo) -> None:
        percent = info.percent
        if percent is None:
            return
        with self._lock:
            speed = self._speed(disk, info)
            last = self._last.get(disk)
            if last is not None and percent - last < self.step and percent < 100:
                return
            if last == percent:
                return
            self._last[disk] = percent
        self.stream.write(f"{disk}: {info.job_type} {percent:5.1f}%  {speed}".rstrip() + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class BarProgress:
    """tqdm bars, one per disk (tqdm only imported on a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.stream = stream
        self._bars: dict[str, Any] = {}  # tqdm bars (untyped)
        self._lock = threading.Lock()
        self._speed = Speed()

    def __call__(self, disk: str, info: JobInfo) -> None:
        percent = info.percent
        if percent is None:
            return
        with self._lock:
            bar = self._bars.get(disk)
            if bar is None:
                bar = self._tqdm(total=100.0, desc=f"{disk} {info.job_type}", unit="%",
                                 position=len(self._bars), file=self.stream, leave=True,
                                 bar_format="{desc}: {percentage:5.1f}%|{bar}| {elapsed} {postfix}")
                self._bars[disk] = bar
            bar.n = percent
            bar.set_postfix_str(self._speed(disk, info), refresh=False)
            bar.refresh()

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.n = bar.total if bar.n > 99 else bar.n
                bar.close()
            self._bars.clear()


def make_progress(enabled: bool,
                  stream: TextIO = sys.stderr) -> LineProgress | BarProgress | None:
    if not enabled:
        return None
    if stream.isatty():
        return BarProgress(stream)
    return LineProgress(stream)


