"""The pool's batching rule lives in `policies.batching` (pure), shared with the simulator."""

from policies.batching import Batch, BatchKey, QueuedJob, SLABatcher

__all__ = ["Batch", "BatchKey", "QueuedJob", "SLABatcher"]
