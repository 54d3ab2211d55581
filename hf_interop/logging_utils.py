"""Logging that follows Accelerate's rule (log on the main process only) and also works before Accelerate starts.

`accelerate.logging.get_logger` raises if no `PartialState`/`Accelerator` exists yet, which is the case for a
library function called from a plain script (loading a model, packing data). This adapter defers to
Accelerate's main-process filtering once its state exists and logs normally before that.
"""

from __future__ import annotations

import logging
from typing import Any


class _MainProcessLogger(logging.LoggerAdapter):
    def log(self, level: int, msg: Any, *args: Any, main_process_only: bool = True, **kwargs: Any) -> None:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            state = PartialState()
            if main_process_only and not state.is_main_process:
                return
        if self.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)

    def warning_once(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if msg not in _warned:
            _warned.add(msg)
            self.warning(msg, *args, **kwargs)


_warned: set[str] = set()


def get_logger(name: str) -> _MainProcessLogger:
    """Logger for `name` that logs on the main process only (see module docstring)."""
    return _MainProcessLogger(logging.getLogger(name), {})
