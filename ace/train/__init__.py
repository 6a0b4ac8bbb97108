"""Training: the host-side rollout queue, the rollout pool, the learner and the AceGRPO loop."""
from ace.train.pool import RolloutPool, RolloutWorkerError
from ace.train.queue import Group, GroupBatch, QueueClosed, RolloutQueue, Sample

__all__ = ["Group", "GroupBatch", "QueueClosed", "RolloutPool", "RolloutQueue", "RolloutWorkerError", "Sample"]
