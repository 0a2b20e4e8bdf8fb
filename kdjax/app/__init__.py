"""The application layer: the ``kdjax`` command (``cli``: ``parser``, ``commands``,
``inputs``), the demo, plots and reporting. Library modules never import it, and
``import kdjax`` loads none of it."""

__all__ = ["UsageError", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class UsageError(Exception):
    """A user mistake on the command line: reported as one line, exit status 2."""
