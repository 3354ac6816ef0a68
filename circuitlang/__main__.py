"""`python -m circuitlang` is the same as the `circuitlang` command."""
import sys

from circuitlang.cli import main

sys.exit(main())
