"""Data path: text -> indexed dataset (preprocess), L-token samples (datasets), which samples
each rank trains on (sampler), and one step's diffusion micro-batches (loader)."""
