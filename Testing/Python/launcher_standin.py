"""Stand-in for CTKAppLauncher, which ``PythonSlicer`` is: the tests' way to run the worker as Slicer does.

It behaves as the launcher does where it matters to stopping a worker: it starts the real interpreter as a
child (not by exec), the child writes to the inherited stdout, no signal is forwarded, SIGTERM (or, on Windows,
TerminateProcess) ends the launcher alone at once, and otherwise it exits with the child's exit code.
Run as ``python launcher_standin.py ARGS...``: the child is ``python ARGS...``.
"""

import subprocess
import sys

if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, *sys.argv[1:]]))
