"""The console every command prints to (rich renders plain text when output is not a terminal)."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
