"""worker-vllm: a RunPod serverless worker that serves LLMs with vLLM."""
