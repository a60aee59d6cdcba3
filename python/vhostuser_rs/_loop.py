"""What the asyncio drivers of both roles share (``aio`` for the front-end, ``Backend.serve_async``
for the back-end): waiting for an fd on the running loop."""

from __future__ import annotations

import asyncio


async def readable(fd: int, timeout: float | None) -> bool:
    """Whether `fd` became readable within `timeout` seconds (None: no limit), waiting on the
    running loop (``loop.add_reader``) without blocking it."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        if timeout is None:
            await ready
        else:
            await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
