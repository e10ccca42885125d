"""Input-adaptive layer skipping (lossy). `first`: FiRST per-layer routers decided at prefill."""
