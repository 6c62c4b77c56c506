"""A tokenizer's chat template, rendered within bounds.

Templates run in transformers' jinja sandbox, which keeps them away from Python's internals but not from
asking for unbounded memory (`{{ 'x' * 400000000 }}` aborted the process) or time (nested loops hang it). A
template arrives inside a model folder like any other input, so every render here runs under an address-space
ceiling and a deadline, and an output longer than any prompt needs is refused: each failure is one line
naming the file the template came from, and the process lives on.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from malleable.errors import InputError, reason

MAX_CHARS = 1_000_000  # a rendered user turn; the longest real prompt is a few thousand tokens
SECONDS = 10.0  # for one render: real templates take well under a millisecond
EXTRA_BYTES = 1 << 30  # address space a render may add to the process


class _Deadline(Exception):
    pass


def template_file(tokenizer) -> str:
    """Where a tokenizer's template was read from, for error messages."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    jinja = folder / "chat_template.jinja"
    return str(jinja if jinja.is_file() else folder / "tokenizer_config.json")


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def _bounded() -> Iterator[None]:
    """Raise MemoryError past EXTRA_BYTES more address space, and _Deadline after SECONDS (the deadline needs
    the main thread, where every verb renders; elsewhere only the memory ceiling holds). Linux only: elsewhere
    the bounds are skipped."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        ceiling = _address_space() + EXTRA_BYTES
        if hard != resource.RLIM_INFINITY:
            ceiling = min(ceiling, hard)
        resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    except (OSError, ValueError):
        soft = None
    timer = threading.current_thread() is threading.main_thread()
    if timer:
        def expire(signum, frame):
            raise _Deadline()

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, SECONDS)
    try:
        yield
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if soft is not None:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def render_user_turn(tokenizer, prompt: str) -> str:
    """`prompt` as the tokenizer's chat template renders a user turn followed by the assistant header."""
    try:
        with _bounded():
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
    except _Deadline:
        raise InputError(f"{template_file(tokenizer)}: the chat template ran for more than {SECONDS:.0f} s "
                         "on one prompt; refusing it") from None
    except MemoryError:
        raise InputError(f"{template_file(tokenizer)}: the chat template asked for more than "
                         f"{EXTRA_BYTES >> 30} GiB of memory on one prompt; refusing it") from None
    except Exception as e:  # jinja's syntax and runtime errors, raise_exception(), type errors in the template
        raise InputError(f"{template_file(tokenizer)}: the chat template fails ({reason(e, typed=True)})") from None
    if not isinstance(text, str):
        raise InputError(f"{template_file(tokenizer)}: the chat template did not render to text")
    if len(text) > MAX_CHARS + len(prompt):
        raise InputError(f"{template_file(tokenizer)}: the chat template rendered {len(text):,} characters for a "
                         f"prompt of {len(prompt):,}; refusing it")
    return text


def check_chat_template(tokenizer) -> None:
    """Render one short prompt, so a broken or hostile template is refused when its model loads."""
    if getattr(tokenizer, "chat_template", None):
        render_user_turn(tokenizer, "hello")
