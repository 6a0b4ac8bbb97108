"""Training: the host-side rollout queue, the rollout pool, the learner and the AceGRPO loop."""
from ace.train.pool import RolloutPool, RolloutWorkerError
from ace.train.queue import Batch, Group, QueueClosed, RolloutQueue, Sample

__all__ = ["Batch", "Group", "QueueClosed", "RolloutPool", "RolloutQueue", "RolloutWorkerError", "Sample"]
