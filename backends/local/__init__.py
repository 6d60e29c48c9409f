"""The local diffusion pool: presets, engine, SLA-aware batcher, workers and the pool backend."""

from .batcher import Batch, QueuedJob, SLABatcher
from .engine import DiffusionEngine, EngineSpec
from .pool import LocalPool, PoolConfig, load_profile
from .workers import BatchRequest, ProcessWorker, ThreadWorker, WarmShape, WorkerCrashed

__all__ = ["Batch", "BatchRequest", "DiffusionEngine", "EngineSpec", "LocalPool", "PoolConfig", "ProcessWorker",
           "QueuedJob", "SLABatcher", "ThreadWorker", "WarmShape", "WorkerCrashed", "load_profile"]
