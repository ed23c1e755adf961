"""`python -m llm_modules.cli` (as `torchrun ... -m llm_modules.cli train` uses it): the command line lives in
`llm_modules.entrypoints.cli`."""

from llm_modules.entrypoints.cli import main

if __name__ == "__main__":
    import sys

    sys.exit(main())
