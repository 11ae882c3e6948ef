"""Batch jobs: the durable queue of a batch's generation items (queue.py, its
backends in queue_stores.py); the worker and the dead-letter queue's admin verbs
come next."""

from .queue import Batch, BatchQueue, Item, open_queue

__all__ = ["Batch", "BatchQueue", "Item", "open_queue"]
