"""A re-entrant lock that is handed over in arrival order.

The replica's UNet lock is taken step by step by two threads: the continuous batch's loop and a
static sampler call (heat maps, full fine-tunes). Python's locks are not fair: a thread that
releases and at once re-acquires usually wins, so a long static call would still starve the
continuous batch. Here a release hands the lock to the oldest waiter, so the two alternate step by
step. Re-entrant, because a finaliser (an evicted pair's unload) may run on a thread holding it.
"""

from __future__ import annotations

import collections
import threading


class FairRLock:
    """``threading.RLock`` semantics, FIFO among waiting threads."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._count = 0
        self._queue: collections.deque = collections.deque()

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._count += 1
                return True
            ticket = object()
            self._queue.append(ticket)
            while self._owner is not None or self._queue[0] is not ticket:
                self._cond.wait()
            self._queue.popleft()
            self._owner, self._count = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a lock this thread does not hold")
            self._count -= 1
            if self._count == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> "FairRLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
