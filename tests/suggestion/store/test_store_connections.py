"""The autocommit connection pool of the one-statement writes (fake connections, no database)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from psycopg.pq import TransactionStatus

from kubetune_suggestion.store.oneshot import Connections


@dataclass
class _Info:
    transaction_status: TransactionStatus = TransactionStatus.IDLE


@dataclass
class _Connection:
    number: int
    broken: bool = False
    closed: bool = False
    info: _Info = field(default_factory=_Info)

    def close(self) -> None:
        self.closed = True


def _pool(size: int) -> tuple[Connections, list[_Connection]]:
    opened: list[_Connection] = []

    def connect() -> _Connection:
        opened.append(_Connection(len(opened)))
        return opened[-1]

    return Connections(connect, size), opened


def test_idle_connections_are_reused_and_unhealthy_ones_dropped() -> None:
    pool, opened = _pool(2)
    first = pool.acquire()
    pool.release(first)
    assert pool.acquire() is first and len(opened) == 1
    first.broken = True
    pool.release(first)
    second = pool.acquire()
    assert first.closed and second is opened[1]
    second.info.transaction_status = TransactionStatus.INERROR
    pool.release(second)
    assert second.closed and pool.acquire() is opened[2]


def test_at_most_size_are_open_and_a_caller_beyond_waits() -> None:
    pool, opened = _pool(2)
    held = [pool.acquire(), pool.acquire()]
    got: list[_Connection] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and len(opened) == 2
    pool.release(held[0])
    waiter.join(5)
    assert got == [held[0]]


def test_close_closes_idle_connections_and_later_returns() -> None:
    pool, _ = _pool(3)
    a, b = pool.acquire(), pool.acquire()
    pool.release(a)
    pool.close()
    assert a.closed and not b.closed
    pool.release(b)
    assert b.closed
