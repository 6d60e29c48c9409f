"""The pool's batching rule lives in `policies.batching` (pure), shared with the simulator."""

from policies.batching import ArrivalRate, Batch, BatchKey, QueuedJob, SLABatcher

__all__ = ["ArrivalRate", "Batch", "BatchKey", "QueuedJob", "SLABatcher"]
