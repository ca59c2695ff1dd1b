"""entroflow: exact per-token entropy of reasoning LLMs."""

__version__ = "0.1.0"
