"""Applications on top of the engine and server (MINICPM4.md §9): tool calls in MiniCPM4's format (tool_calls.py)."""
