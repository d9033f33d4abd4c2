"""Speech synthesis (Qwen3-TTS): loading, the batched streaming engine, audio encoding and voices."""
