"""Progress on the terminal, and quiet everywhere else.

Takes how much work a long run has (a check's claim breakdown and permutation test,
a patching sweep's rows, a discovery method's edges or steps) and how much is done;
gives one line on stderr with a bar, the rate and an ETA, drawn by `tqdm` (a
dependency of `transformers` and of `huggingface_hub`, so always installed with
them). The bar is shown only when its stream is a terminal: piped into a file or
another program, or under `--quiet` (`enabled=False`), nothing is written at all.

`quiet_loading()` is the other half of a clean terminal: while a model loads, it
turns off the third-party chatter (transformers' "Loading weights" bar, its and
huggingface_hub's log warnings, Python warnings) and restores every setting it
touched afterwards, so nothing global changes at import time or outlives the load.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import IO

__all__ = ["MIN_INTERVAL", "Progress", "quiet_loading"]

#: seconds between two redraws of a bar, at least
MIN_INTERVAL = 0.1


class Progress:
    """A progress bar with an ETA on stderr; silent when stderr is not a terminal.

    Args:
        total: units of work (a claim, a random circuit, a sweep's row, an edge).
        label: what is running ("checking", "acdc tau=0.01").
        enabled: True to draw, False (`--quiet`) to stay silent; None (the default)
            draws only when `stream` is a terminal.
        stream: where to draw (default: `sys.stderr` as it is when the bar is made).
        min_interval: seconds between redraws at least (default `MIN_INTERVAL`).

    Use it as `bar.set(done, what)` or `bar.step(what)`, then `bar.close()` (or as a
    context manager). `done` is how many units are finished, whether or not it draws.
    """

    def __init__(self, total: int, label: str, *, enabled: bool | None = None, stream: IO[str] | None = None,
                 min_interval: float | None = None):
        self.total = max(1, int(total))
        self.label = label
        self.done = 0
        stream = sys.stderr if stream is None else stream
        if enabled is None:
            enabled = _is_terminal(stream)
        self.enabled = bool(enabled)
        self._bar = None
        if self.enabled:
            # tqdm's text bar (in a notebook too: no widget dependency)
            from tqdm import tqdm

            # leave=False: the bar is erased when the run ends, so the report that
            # follows starts on a clean line.
            self._bar = tqdm(total=self.total, desc=label, file=stream, leave=False, dynamic_ncols=True,
                             mininterval=MIN_INTERVAL if min_interval is None else min_interval,
                             miniters=1, smoothing=0.1)

    def step(self, what: str = "") -> None:
        """One more unit finished."""
        self.set(self.done + 1, what)

    def step_by(self, units: int, what: str = "") -> None:
        """`units` more finished."""
        self.set(self.done + units, what)

    def set(self, done: int, what: str = "") -> None:
        """`done` of `total` units finished; `what` says what is running now."""
        done = min(int(done), self.total)
        delta, self.done = done - self.done, done
        if self._bar is None:
            return
        if what:
            self._bar.set_postfix_str(what[:40], refresh=False)
        if delta > 0:
            self._bar.update(delta)
        else:
            self._bar.refresh()

    def close(self) -> None:
        """Erase the bar (a no-op when silent, and when closed already)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed stream
        return False


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers and huggingface_hub while a model or tokenizer loads.

    Inside the block: transformers' progress bars off (the "Loading weights" bar),
    transformers' and huggingface_hub's loggers at ERROR, Python warnings ignored.
    Everything is restored on the way out, error or not. Errors themselves still
    propagate: circuitlang turns them into its own messages.
    """
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hub_bars_were_off = are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()
        disable_progress_bars()
        hf_logging.set_verbosity_error()
        hub_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            hub_logger.setLevel(hub_level)
            hf_logging.set_verbosity(verbosity)
            if bars_were_on:  # this also turns huggingface_hub's bars back on...
                hf_logging.enable_progress_bar()
            if hub_bars_were_off:  # ...which are then set back as they were
                disable_progress_bars()
            else:
                enable_progress_bars()
