"""The admission's tuning values, in one place: each with where it was measured and why it
holds beyond that machine. Measured on a 2-core x86-64 CPU (vLLM's CPU build, the demo model,
a KV cache of ~4,000 tokens); the reasoning for GPUs is arithmetic, not measurement.
"""

# Finished requests the share of max_tokens they used is averaged over.
HISTORY = 64
# Weight of the latest finished request in the expected size of the next job.
RECENT_WEIGHT = 0.25

# Share of the KV cache the projection may fill: the rest absorbs requests that grow past
# their expected size. Long loads (600 + 300 tokens), `benchmarks/run.py --admission` on a 2-core
# x86-64 CPU: 0 preempted at 0.95.
KV_TARGET = 0.95
# Short jobs may fill more than the cache: requests taken together grow together, and when
# they outgrow it vLLM preempts the newest and recomputes it from its tokens later. Measured on
# a 2-core x86-64 CPU (`benchmarks/run.py --admission`), 136-token jobs: 0.92-0.98x a fixed 32 at
# 1.3 where 0.95 gave 0.80-1.01x.
KV_TARGET_SHORT = 1.3
# Short: a job whose whole life (prompt and expected output) is within SHORT_JOB_SHARE of the
# cache AND within the engine's max_num_batched_tokens: recomputing a preempted one is then at
# most one engine step's prefill, whatever the GPU (a share alone would call a 27,000-token job
# short on an H100's cache).
SHORT_JOB_SHARE = 1 / 16

# KV_START_LIMIT, the KV-cache use past which nothing starts beside other requests, is in
# worker_vllm.engine_state: batch jobs read it too.

# A take brings at most this many times the jobs the engine has shown it holds at once (jobs in
# it and those that ended since the last take): the ramp from idle to N jobs is log2(N) + 1
# takes, and a change to longer jobs shows before it can over-fill the cache.
RAMP = 2

# The intake's state is logged at each change, at most once per REGIME_LOG_S, and once per
# BUSY_LOG_S while jobs run.
REGIME_LOG_S = 10.0
BUSY_LOG_S = 60.0
