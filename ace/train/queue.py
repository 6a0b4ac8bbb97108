"""Host-side async queue between rollout workers and the learner: whole groups, bounded staleness.

GRPO advantages are relative to the other samples of the same task, so the unit of release is a
complete group of G samples, never a single sample and never part of a group. Each sample carries
the policy version that produced it; at release time the learner's current version decides whether
a group is fresh, or stale (older than `max_staleness` versions), in which case it is dropped or
kept and marked for truncated importance ratios, as the queue's policy says. Every decision is
counted in `metrics()` so nothing is silently mixed (docs/architecture.md, "Invariants", 3).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Hashable, Sequence

import numpy as np

STALENESS_POLICIES = ("drop", "reweight")


class QueueClosed(RuntimeError):
    """The queue was closed: producers may not put, and a consumer cannot get a full batch."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One finished episode (or one step of it) for one task.

    Args:
      task_id: the task (curriculum table id) the sample answers.
      prompt_ids: [P] int token ids of the prompt.
      output_ids: [T] int token ids the policy produced.
      rollout_logprobs: [T] float behaviour logprobs the engine returned for `output_ids`.
      reward: scalar reward of the sample.
      duration_s: wall-clock seconds the episode took (for duration-aware weighting).
      policy_version: the oldest weight version that produced any of `output_ids`.
      extra: free metadata (finish reason, grading details); not interpreted by the queue.
      routing: optional [L, P + T, k] int routed experts of every position (`Generation.routing`,
        -1 where unknown), for routing replay.
    """

    task_id: int
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    rollout_logprobs: Sequence[float]
    reward: float
    duration_s: float
    policy_version: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    routing: Any = None

    def __post_init__(self):
        if len(self.output_ids) != len(self.rollout_logprobs):
            raise ValueError(f"sample of task {self.task_id}: {len(self.output_ids)} output ids but "
                             f"{len(self.rollout_logprobs)} rollout_logprobs; expected one logprob per token")
        if self.policy_version < 0:
            raise ValueError(f"policy_version must be >= 0, got {self.policy_version}")
        if self.duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {self.duration_s}")
        n = len(self.prompt_ids) + len(self.output_ids)
        if self.routing is not None and (np.ndim(self.routing) != 3 or np.shape(self.routing)[1] != n):
            raise ValueError(f"sample of task {self.task_id}: routing must be [L, P + T = {n}, k], "
                             f"got shape {np.shape(self.routing)}")


@dataclasses.dataclass
class Group:
    """The G samples of one task that share a group-relative baseline.

    `group_id` identifies this group among concurrent groups of the same task (a task may be
    sampled twice before either group is back); it defaults to a fresh object.
    """

    task_id: int
    group_size: int
    samples: list[Sample] = dataclasses.field(default_factory=list)
    group_id: Hashable = dataclasses.field(default_factory=object)

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if len(self.samples) > self.group_size:
            raise ValueError(f"group of task {self.task_id} has {len(self.samples)} samples, "
                             f"more than group_size={self.group_size}")
        for s in self.samples:
            self._check_task(s)

    def _check_task(self, sample: Sample):
        if sample.task_id != self.task_id:
            raise ValueError(f"sample of task {sample.task_id} added to a group of task {self.task_id}")

    @property
    def complete(self) -> bool:
        return len(self.samples) == self.group_size

    def add(self, sample: Sample) -> None:
        self._check_task(sample)
        if self.complete:
            raise ValueError(f"group {self.group_id!r} of task {self.task_id} already holds all "
                             f"{self.group_size} samples; an extra sample would be a duplicate")
        self.samples.append(sample)

    @property
    def oldest_version(self) -> int:
        return min(s.policy_version for s in self.samples)


@dataclasses.dataclass(frozen=True)
class GroupBatch:
    """N whole groups released together for one learner step.

    Attributes:
      groups: the N complete groups, oldest first.
      current_version: the learner version the staleness was measured against.
      sample_staleness: [N, G] int, `current_version - policy_version` of each sample.
      staleness: [N] int, the staleness of each group (that of its oldest sample).
      is_stale: [N] bool, True where `staleness > max_staleness` (only possible under "reweight"):
        the learner must correct these with truncated importance ratios against `rollout_logprobs`.
      staleness_weight: [N] float32, `reweight_decay ** (staleness - max_staleness)` for stale
        groups, 1.0 for fresh ones; a multiplier on the group's loss, on top of the IS correction.
    """

    groups: list[Group]
    current_version: int
    sample_staleness: np.ndarray
    staleness: np.ndarray
    is_stale: np.ndarray
    staleness_weight: np.ndarray

    @property
    def samples(self) -> list[Sample]:
        """The N*G samples, group-major (group i owns samples [i*G, (i+1)*G))."""
        return [s for g in self.groups for s in g.samples]


class RolloutQueue:
    """Thread-safe bounded queue of complete groups with a staleness policy.

    Capacity counts groups, complete or still filling. A put that would open a new group blocks
    while the queue is full (backpressure on the rollout side); a sample that joins a group
    already open never blocks, since it cannot grow the count and the group must fill up before
    anyone can consume it. Producers that each add samples to several groups should open groups
    in one global order (e.g. by group id); otherwise every slot can end up holding a partial
    group whose missing samples belong to producers blocked on opening another.

    Args:
      capacity_groups: most groups held at once (open + ready).
      max_staleness: groups whose oldest sample is more than this many versions behind the
        learner are stale.
      policy: "drop" discards stale groups (counted); "reweight" keeps them, marked in the batch.
      reweight_decay: under "reweight", the per-version loss multiplier of stale groups; 1.0
        leaves the correction entirely to the truncated importance ratios.
    """

    def __init__(self, capacity_groups: int, *, max_staleness: int, policy: str,
                 reweight_decay: float = 1.0):
        if capacity_groups < 1:
            raise ValueError(f"capacity_groups must be >= 1, got {capacity_groups}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if policy not in STALENESS_POLICIES:
            raise ValueError(f"policy must be one of {STALENESS_POLICIES}, got {policy!r}")
        if not 0.0 < reweight_decay <= 1.0:
            raise ValueError(f"reweight_decay must be in (0, 1], got {reweight_decay}")
        self.capacity_groups = capacity_groups
        self.max_staleness = max_staleness
        self.policy = policy
        self.reweight_decay = reweight_decay

        self._cond = threading.Condition()
        self._open: dict[Hashable, Group] = {}
        self._ready: collections.deque[Group] = collections.deque()
        # Ids of groups already released or dropped: a late sample for one of them is a duplicate.
        self._finished_ids: set[Hashable] = set()
        self._ready_ids: set[Hashable] = set()
        self._closed = False
        self._counts = collections.Counter()
        self._staleness_sum = 0
        self._staleness_n = 0
        self._staleness_max = 0
        self._wait_s = 0.0
        self._put_block_s = 0.0
        self._first_get_t: float | None = None
        self._last_get_t: float | None = None

    # ------------------------------------------------------------------ producers
    def put_sample(self, sample: Sample, *, group_id: Hashable, group_size: int,
                   timeout: float | None = None) -> bool:
        """Adds one sample to the group `group_id`, opening it if needed.

        Returns True when this sample completed the group. Raises TimeoutError if the queue stayed
        full for `timeout` seconds (None: wait forever), QueueClosed after `close()`, ValueError for
        a duplicate sample (the group is already full or was already released).
        """
        with self._cond:
            self._check_open_for_put()
            if group_id in self._finished_ids or group_id in self._ready_ids:
                raise ValueError(f"group {group_id!r} is already complete, released or dropped; "
                                 f"a late sample of task {sample.task_id} would be a duplicate")
            group = self._open.get(group_id)
            if group is None:
                self._wait_for_room(timeout, unless_opened=group_id)
                # Another producer may have opened (even completed) this group while we waited.
                if group_id in self._finished_ids or group_id in self._ready_ids:
                    raise ValueError(f"group {group_id!r} completed while a sample of task "
                                     f"{sample.task_id} waited for room; it would be a duplicate")
                group = self._open.get(group_id)
            if group is None:
                group = Group(task_id=sample.task_id, group_size=group_size, group_id=group_id)
                self._open[group_id] = group
            elif group.group_size != group_size:
                raise ValueError(f"group {group_id!r} was opened with group_size={group.group_size}, "
                                 f"got group_size={group_size}")
            group.add(sample)
            self._counts["samples_put"] += 1
            if group.complete:
                del self._open[group_id]
                self._ready.append(group)
                self._ready_ids.add(group_id)
                self._counts["groups_put"] += 1
                self._cond.notify_all()
                return True
            return False

    def put_group(self, group: Group, *, timeout: float | None = None) -> None:
        """Adds a complete group. Same errors as `put_sample`; an incomplete group is a ValueError."""
        if not group.complete:
            raise ValueError(f"put_group needs a complete group: task {group.task_id} has "
                             f"{len(group.samples)} of {group.group_size} samples (use put_sample)")
        with self._cond:
            self._check_open_for_put()
            if (group.group_id in self._finished_ids or group.group_id in self._open
                    or group.group_id in self._ready_ids):
                raise ValueError(f"group {group.group_id!r} of task {group.task_id} is already in the queue")
            self._wait_for_room(timeout)
            self._ready.append(group)
            self._ready_ids.add(group.group_id)
            self._counts["samples_put"] += len(group.samples)
            self._counts["groups_put"] += 1
            self._cond.notify_all()

    def _check_open_for_put(self):
        if self._closed:
            raise QueueClosed("put on a closed RolloutQueue")

    def _wait_for_room(self, timeout: float | None, unless_opened: Hashable = None):
        def full():
            if unless_opened is not None and unless_opened in self._open:
                return False
            return len(self._open) + len(self._ready) >= self.capacity_groups

        if not full():
            return
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        try:
            while full():
                self._check_open_for_put()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"RolloutQueue full ({self.capacity_groups} groups) for {timeout} s")
                self._cond.wait(remaining)
            self._check_open_for_put()
        finally:
            self._put_block_s += time.monotonic() - t0

    # ------------------------------------------------------------------ consumer
    def get_batch(self, n_groups: int, *, current_version: int, timeout: float | None = None) -> GroupBatch:
        """Waits for `n_groups` complete groups that pass the staleness policy and returns them.

        Stale groups met on the way are dropped (policy "drop") before they count. Raises
        TimeoutError after `timeout` seconds (None: wait forever) and QueueClosed if the queue is
        closed before enough groups are ready; in both cases the groups already ready stay queued.
        """
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        if n_groups > self.capacity_groups:
            raise ValueError(f"n_groups={n_groups} can never be served by a queue of "
                             f"capacity_groups={self.capacity_groups}")
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        with self._cond:
            if self._first_get_t is None:
                self._first_get_t = t0
            try:
                while True:
                    if self.policy == "drop":
                        self._drop_stale(current_version)
                    if len(self._ready) >= n_groups:
                        self._check_versions(n_groups, current_version)
                        break
                    if self._closed:
                        raise QueueClosed(f"RolloutQueue closed with {len(self._ready)} ready groups, "
                                          f"{n_groups} requested")
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"only {len(self._ready)} of {n_groups} groups ready "
                                           f"after {timeout} s")
                    self._cond.wait(remaining)
                groups = [self._ready.popleft() for _ in range(n_groups)]
                for g in groups:
                    self._ready_ids.discard(g.group_id)
                    self._finished_ids.add(g.group_id)
                # Room was freed: wake blocked producers.
                self._cond.notify_all()
                return self._make_batch(groups, current_version)
            finally:
                now = time.monotonic()
                self._wait_s += now - t0
                self._last_get_t = now

    def _check_versions(self, n_groups: int, current_version: int):
        newest = max(s.policy_version for i in range(n_groups) for s in self._ready[i].samples)
        if newest > current_version:
            raise ValueError(f"a sample has policy_version {newest}, newer than "
                             f"current_version={current_version}; the learner's version must be passed")

    def _drop_stale(self, current_version: int):
        kept = collections.deque()
        for g in self._ready:
            if current_version - g.oldest_version > self.max_staleness:
                self._ready_ids.discard(g.group_id)
                self._finished_ids.add(g.group_id)
                self._counts["dropped_stale"] += 1
                self._counts["samples_dropped_stale"] += len(g.samples)
            else:
                kept.append(g)
        if len(kept) != len(self._ready):
            self._ready = kept
            self._cond.notify_all()

    def _make_batch(self, groups: list[Group], current_version: int) -> GroupBatch:
        n, g_max = len(groups), max(g.group_size for g in groups)
        # Groups of one batch may differ in size only if producers chose so; pad with -1.
        sample_staleness = np.full((n, g_max), -1, dtype=np.int64)
        for i, g in enumerate(groups):
            for j, s in enumerate(g.samples):
                sample_staleness[i, j] = current_version - s.policy_version
        staleness = sample_staleness.max(axis=1)
        is_stale = staleness > self.max_staleness
        weight = np.where(is_stale, self.reweight_decay ** np.maximum(staleness - self.max_staleness, 0),
                          1.0).astype(np.float32)
        valid = sample_staleness >= 0
        self._counts["groups_released"] += n
        self._counts["samples_released"] += int(valid.sum())
        self._counts["reweighted"] += int(is_stale.sum())
        self._staleness_sum += int(sample_staleness[valid].sum())
        self._staleness_n += int(valid.sum())
        self._staleness_max = max(self._staleness_max, int(staleness.max()))
        return GroupBatch(groups=groups, current_version=current_version, sample_staleness=sample_staleness,
                     staleness=staleness, is_stale=is_stale, staleness_weight=weight)

    # ------------------------------------------------------------------ lifecycle and metrics
    def close(self) -> None:
        """Wakes every blocked producer and consumer; later puts raise QueueClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        """Number of complete groups ready to be released."""
        with self._cond:
            return len(self._ready)

    def metrics(self) -> dict[str, float]:
        """Flat dict of counters for logging.

        `learner_idle_fraction` is the time spent waiting inside `get_batch` over the wall time
        from the first `get_batch` call to the end of the last one.
        """
        with self._cond:
            span = 0.0
            if self._first_get_t is not None and self._last_get_t is not None:
                span = self._last_get_t - self._first_get_t
            return {
                "samples_put": float(self._counts["samples_put"]),
                "groups_put": float(self._counts["groups_put"]),
                "groups_released": float(self._counts["groups_released"]),
                "samples_released": float(self._counts["samples_released"]),
                "dropped_stale": float(self._counts["dropped_stale"]),
                "samples_dropped_stale": float(self._counts["samples_dropped_stale"]),
                "reweighted": float(self._counts["reweighted"]),
                "mean_staleness": self._staleness_sum / self._staleness_n if self._staleness_n else 0.0,
                "max_staleness": float(self._staleness_max),
                "learner_wait_s": self._wait_s,
                "learner_idle_fraction": self._wait_s / span if span > 0 else 0.0,
                "producer_block_s": self._put_block_s,
                "ready_groups": float(len(self._ready)),
                "open_groups": float(len(self._open)),
            }
