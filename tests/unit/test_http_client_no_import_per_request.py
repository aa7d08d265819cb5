"""httpcore asks `import sniffio` on every request to learn which event loop runs it. Without sniffio
installed that is a failed import each time, a search of every sys.path entry (it was ~20 % of
provisioning's CPU in the pipeline benchmark): the dependency is declared in libs/common for that."""

from __future__ import annotations

import asyncio
import sys
from importlib.abc import MetaPathFinder

from httpcore._synchronization import current_async_library


class LookupRecorder(MetaPathFinder):
    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        self.names.append(fullname)
        return None  # let the real finders answer


def test_asking_for_the_event_loop_imports_nothing_after_the_first_time():
    async def ask_twice() -> str:
        current_async_library()  # the first call may import sniffio; later ones must not look again
        recorder = LookupRecorder()
        sys.meta_path.insert(0, recorder)
        try:
            for _ in range(3):
                library = current_async_library()
        finally:
            sys.meta_path.remove(recorder)
        assert recorder.names == []
        return library

    assert asyncio.run(ask_twice()) == "asyncio"
