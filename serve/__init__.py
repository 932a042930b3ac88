"""HTTP serving: the OpenAI-compatible API and the web chat page (see serve/app.py)."""
