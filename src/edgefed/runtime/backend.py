"""Process-wide llama.cpp set-up: backend init once, and its log routed to Python logging.

llama.cpp writes its reasons for refusing a model or an adapter to its log, not to a return
value. We keep the last error lines so that a failed load can say *why* in one line.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading

logger = logging.getLogger("edgefed.llama_cpp")

_lock = threading.Lock()
_initialised = False
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
_log_callback = None  # kept referenced: llama.cpp calls it from C for the whole process
_GGML_LOG_LEVEL_ERROR = 4


def ensure_backend():
    """Import llama_cpp, initialise its backend once and install our log callback."""
    global _initialised, _log_callback
    import llama_cpp

    with _lock:
        if _initialised:
            return llama_cpp

        @llama_cpp.llama_log_callback
        def _on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
            message = text.decode("utf-8", errors="replace").rstrip()
            if not message:
                return
            if level == _GGML_LOG_LEVEL_ERROR:
                _recent_errors.append(message)
                logger.debug("llama.cpp error: %s", message)
            else:
                logger.debug("llama.cpp: %s", message)

        _log_callback = _on_log
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True
    return llama_cpp


def take_recent_errors() -> str:
    """The error lines llama.cpp logged since the last call, joined; empties the buffer."""
    with _lock:
        lines = [line.strip() for line in _recent_errors]
        _recent_errors.clear()
    return "; ".join(line for line in lines if line)
