"""``python -m tests.system.gc_probe ROUTER-OPTIONS``: the router, with a probe in its worker process.

Every 0.1 s the probe runs the garbage collector and writes, to the file named
by ``$PTTH_GC_PROBE``, how many objects the collector has freed in that worker
so far (objects in reference cycles: reference counting alone never frees
them) and how many reports it wrote.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time

from ptth_sync.router import worker
from ptth_sync.router.server import main

_freed = [0]


def _count(phase: str, info: dict) -> None:
    if phase == "stop":
        _freed[0] += info["collected"]


def _report(path: str) -> None:
    reports = 0
    while True:
        gc.collect()
        reports += 1
        partial = f"{path}.{os.getpid()}"
        with open(partial, "w") as out:  # (json.dumps: json.dump's encoder makes reference cycles itself)
            out.write(json.dumps({"freed": _freed[0], "reports": reports}))
        os.replace(partial, path)
        time.sleep(0.1)


_run = worker.RouterWorker.run


def _probed_run(self: worker.RouterWorker) -> None:
    gc.callbacks.append(_count)
    threading.Thread(target=_report, args=(os.environ["PTTH_GC_PROBE"],), daemon=True).start()
    _run(self)


worker.RouterWorker.run = _probed_run  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "ptth_sync.router"
    sys.exit(main())
