"""The unit of every memory figure aift logs or returns under a ``*_gb`` name (peak_mem_gb, rss_gb, gpu_mem_gb,
total_gb, ...): the decimal gigabyte, 10^9 bytes. Its own module so that torch-free code (the system-metrics
sampler) can use it."""

GB = 10**9


def to_gb(num_bytes: float) -> float:
    """Bytes -> decimal GB."""
    return num_bytes / GB
