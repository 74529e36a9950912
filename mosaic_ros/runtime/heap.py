"""Short garbage-collector pauses on a long-running stream.

After torch, transformers and a model are loaded the interpreter holds ~430,000 objects that
live as long as the process. Python's cyclic collector walks all of them in every full
(generation 2) collection, which the objects a stream keeps making trigger now and then.
Measured at the 7B shape while mosaic's split queue still made a list per queued pair
(docs/INGEST.md): about one per 120 frames, 206-226 ms each with the GIL held, so the frame
that meets it (and every ROS callback) stalls that long.
``freeze_startup_objects`` moves what exists at the end of startup into the collector's
permanent generation (``gc.freeze``); full collections then walk only what the stream made
since, 1-3 ms each. Nothing is leaked: frozen objects are freed by reference counting as usual,
and they are unfrozen at exit so that the interpreter's final collection still sees them
(extension modules check for leaks then).
"""

from __future__ import annotations

import atexit
import gc

_unfreeze_registered = False


def freeze_startup_objects() -> int:
    """Collect once, then exempt every object alive now from later collections' walks; call it
    when startup is done (imports and model loaded). Returns the objects now frozen."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True
    return gc.get_freeze_count()
