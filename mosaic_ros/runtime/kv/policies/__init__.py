"""Built-in KV policies; importing this package registers every one of them with ``make_policy``."""

from mosaic_ros.runtime.kv.policies import dense, livevlm, mosaic, rekv, token_topk, window

__all__ = ["dense", "livevlm", "mosaic", "rekv", "token_topk", "window"]
