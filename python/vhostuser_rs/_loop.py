"""What the asyncio drivers of both roles share (``aio`` for the front-end, ``Backend.serve_async``
for the back-end): waiting for an fd on the running loop."""

from __future__ import annotations

import asyncio


async def readable(fd: int, timeout: float | None) -> bool:
    """Whether `fd` became readable within `timeout` seconds (None: no limit), waiting on the
    running loop (``loop.add_reader``) without blocking it. The timeout is a timer on the same
    future rather than ``asyncio.wait_for``, which on Python 3.11 can swallow a cancellation that
    arrives as the fd becomes readable (the caller's loop would then never see it)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bool] = loop.create_future()

    def settle(value: bool) -> None:
        if not ready.done():
            ready.set_result(value)

    loop.add_reader(fd, settle, True)
    timer = loop.call_later(timeout, settle, False) if timeout is not None else None
    try:
        return await ready
    finally:
        loop.remove_reader(fd)
        if timer is not None:
            timer.cancel()
