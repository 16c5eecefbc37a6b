"""Bounds on what a template may cost: jinja2's immutable sandbox plus limits on the
size of any value one operation builds, and a deadline for the whole render.

A GGUF file's template is code from the internet: the sandbox keeps it away from
Python's internals; these keep it from eating the CPU or the memory.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

T = TypeVar("T")

MAX_VALUE_CHARS = 16 * 2**20  # any string or list one operation builds
MAX_INT_ARG = 100_000  # the largest count or width a call may ask for (jinja's MAX_RANGE)
_BIG_WIDTH = re.compile(r"\d{6,}")  # a width or precision of 100,000+ in a format string


class TemplateError(Exception):
    """A template could not be compiled or rendered."""


class _RenderTimeout(BaseException):
    """Raised inside a render that ran past its deadline (a BaseException, so
    that no `except Exception` in a filter or in jinja swallows it)."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else 0


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_INT_ARG:
            raise SecurityError(f"a template argument of {a} is too large")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise SecurityError("a format width in the template is too large")


def _check_size(value: T) -> T:
    if _size(value) > MAX_VALUE_CHARS:
        raise SecurityError("the template built a value that is too large")
    return value


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a join whose result size is checked."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, plus bounds on what one operation may build."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["+", "*", "%", "**"])

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise SecurityError("an exponent in the template is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_VALUE_CHARS:
                    raise SecurityError("the template built a value that is too large")
        if operator == "+" and _size(left) + _size(right) > MAX_VALUE_CHARS:
            raise SecurityError("the template built a value that is too large")
        if operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        if getattr(__obj, "__name__", "") in ("format", "format_map"):
            _check_format(getattr(__obj, "__self__", None))
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    @staticmethod
    def bounded_join(parts: tuple[Any, ...]) -> str:
        return _check_size("".join(str(p) for p in parts))


def bounded_filter(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment marks
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        if fn.__name__ == "do_format" and args:
            _check_format(args[-1] if not isinstance(args[0], str) else args[0])
        return _check_size(fn(*args, **kwargs))

    return wrapper


class _Watchdog:
    """One thread that interrupts renders past their deadline (no thread per render).

    It polls a few times a second instead of being woken for each render: waking it
    would make the rendering thread hand over the GIL, a measurable cost per request.
    """

    POLL = 0.2

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[int, float] = {}  # thread id -> monotonic deadline
        self._fired: set[int] = set()
        self._thread: threading.Thread | None = None

    def watch(self, tid: int, seconds: float) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hostler-render-watchdog")
                self._thread.daemon = True
                self._thread.start()
            self._deadlines[tid] = time.monotonic() + seconds

    def unwatch(self, tid: int) -> bool:
        """Stop watching; True if the deadline passed (any exception still pending in
        the thread is withdrawn, so it cannot surface after this call)."""
        with self._cond:
            self._deadlines.pop(tid, None)
            fired = tid in self._fired
            if fired:
                self._fired.discard(tid)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
            return fired

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for tid, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[tid]
                        self._fired.add(tid)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(tid), ctypes.py_object(_RenderTimeout)
                        )
                nearest = min(self._deadlines.values(), default=now + self.POLL)
                self._cond.wait(min(max(nearest - now, 0.001), self.POLL))


_WATCHDOG = _Watchdog()


def run_with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """Run `fn` in this thread; past `seconds`, interrupt it and raise TemplateError.

    Python code cannot be killed from outside, but an asynchronous exception raised
    into its thread stops a pure-Python loop (a template's nested `for`) at its next
    bytecode.
    """
    tid = threading.get_ident()
    _WATCHDOG.watch(tid, seconds)
    try:
        result = fn()
    except _RenderTimeout:
        pass  # reported below
    finally:
        timed_out = _WATCHDOG.unwatch(tid)
    if timed_out:
        raise TemplateError(f"the template took longer than {seconds:g} s to render")
    return result
