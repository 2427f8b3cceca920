"""RunPod's limits on what a job sends back, and a job's output weighed against them.

RunPod's queue endpoints take at most 1 MB in one stream message and 20 MB in a job's result
(RunPod's docs: serverless endpoint operations). The runpod SDK posts every yield of a
generator handler as a stream message and, with ``return_aggregate_stream``, all of them
again as the job's result; it only logs a post the platform refused.
"""

from __future__ import annotations

# The platform's limits, in bytes of the JSON body posted (taken as decimal megabytes, the
# smaller reading).
STREAM_MESSAGE_LIMIT = 1_000_000
RESULT_LIMIT = 20_000_000

# A stream message's own items (deltas, SSE events, batch lines) are kept below this, leaving
# room for the message's envelope (usage, choice structure).
STREAM_MESSAGE_BUDGET = 900_000
# A job's result that repeats its stream messages is kept below this (the envelope of the
# result and of each message is a few bytes each).
RESULT_BUDGET = 19_500_000

STREAM_HINT = ('send the job with "stream": true and read its output from /stream (or '
               '/status while it runs)')


def too_large_for_a_message(what: str, size: int) -> str:
    return (f"{what} is {size:,} bytes as JSON, over RunPod's limit of "
            f"{STREAM_MESSAGE_LIMIT:,} bytes for one stream message")


def too_large_for_a_result(what: str, size: int) -> str:
    return (f"{what} is {size:,} bytes as JSON, over RunPod's limit of {RESULT_LIMIT:,} "
            f"bytes for a job's result; {STREAM_HINT}")
