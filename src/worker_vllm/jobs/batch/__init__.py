"""Batch jobs: many OpenAI requests (Batch API request lines) in one queue job."""
