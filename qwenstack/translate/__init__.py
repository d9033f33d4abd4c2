"""Live speech translation: committed source text -> append-only translation -> streamed speech."""
