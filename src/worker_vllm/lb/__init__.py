"""The load-balancing front-end: vLLM's app served over HTTP on PORT, /ping on PORT_HEALTH."""
