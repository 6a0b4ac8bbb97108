"""Wall-clock timing shared by the benchmark scripts (imported as `timing` when run as bench/<name>.py)."""
import statistics
import time


def median_seconds(fn, reps: int) -> float:
    """Median wall time of `fn()` over `reps` calls, after one warm-up call (compile, first allocation)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
