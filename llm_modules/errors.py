"""One exception type for bad user input; the CLI prints its message and exits non-zero, no traceback."""


class LLMModulesError(Exception):
    """A problem the user can fix (bad spec, malformed data line, missing file...).

    The message must name what is wrong and where (file and line, spec, option).
    """
