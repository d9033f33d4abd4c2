"""The cost tools: what a model needs (memory, parameters) and how fast it decodes here (`qwenstack plan`)."""
