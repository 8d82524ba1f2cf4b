"""What the interrupt tests hand the runs they signal."""

import signal


def signals_as_from_a_terminal() -> None:
    """Gives the child SIGINT's default disposition, in the child before it starts.

    A process a non-interactive shell starts in the background inherits SIGINT ignored
    (POSIX), and so does every process it starts: a CI runner that starts the suite that
    way would hand the run an ignored SIGINT, Python would install no
    KeyboardInterrupt handler, and the run would go on calibrating past the signal. A
    user's Ctrl-C comes from a terminal, where SIGINT is not ignored.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
