"""`python -m dd2cli ...` (also what `torchrun -m dd2cli` runs)."""

from .cli import main

main()
