"""Quality measurement: perplexity on held-out text and what quantization costs against a baseline."""
