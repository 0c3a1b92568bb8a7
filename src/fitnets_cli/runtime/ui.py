"""The console every command prints to: rich bars in a terminal, plain lines in a log file."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
if not console.is_terminal:
    console.width = 200   # log files: keep wide tables on one line each
errors = Console(stderr=True, highlight=False, soft_wrap=True)
