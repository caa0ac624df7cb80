"""Compile a C source that ships with the package, once per source and compiler, into a cache.

The native kernel (a shared library) and the emulated cluster's delay switch (a program) are
built on first use with ``$CC`` (default ``cc``) into ``$SPARSETRAIN_CACHE_DIR`` or
``~/.cache/sparsetrain``, under a name that carries a hash of the source, the compiler command,
the flags and the machine, so every later process finds the result at once. Concurrent first
uses each compile to a file of their own and rename it into place.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def cache_dir() -> Path:
    """Where compiled sources are kept: ``$SPARSETRAIN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/sparsetrain``, else ``~/.cache/sparsetrain``."""
    root = os.environ.get("SPARSETRAIN_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparsetrain"


def _check_owned(path: Path) -> None:
    """Refuse a cached file that another user could have written: the name is predictable, and
    the delay switch runs as root. The file must be this user's and writable by no one else,
    in a folder that others cannot write to (or only with the sticky bit, as /tmp)."""
    st, folder = path.stat(), path.parent.stat()
    unsafe = st.st_uid != os.geteuid() or st.st_mode & 0o022
    unsafe = unsafe or (folder.st_mode & 0o022 and not folder.st_mode & 0o1000)
    if unsafe:
        raise RuntimeError(
            f"{path} or its folder can be written by another user; refusing to use it (remove "
            f"it, or `chmod go-w {shlex.quote(str(path.parent))}` if the folder is yours, or set "
            "SPARSETRAIN_CACHE_DIR to a folder of your own)"
        )


def compiler() -> list[str]:
    """The C compiler's command: ``$CC`` split as a shell would, default ``cc``."""
    return shlex.split(os.environ.get("CC", "cc")) or ["cc"]


def compile_cached(source: Path, flags: Sequence[str], suffix: str = "") -> Path:
    """Return the path of ``source`` compiled with ``flags``, compiling it unless cached.

    Args:
        source: the C file.
        flags: compiler flags (``-shared -fPIC`` for a library; none of those for a program).
        suffix: the file name's ending (``".so"``, or ``""`` for a program).

    Raises:
        RuntimeError: the compiler is missing, failed, or took over two minutes (the message
            holds the command and the end of its error output), or a cached file could have
            been written by another user.
    """
    text = source.read_bytes()
    cc = compiler()
    key = repr((cc, list(flags), os.uname().machine)).encode()
    tag = hashlib.sha256(text + key).hexdigest()
    # Absolute: a bare name (SPARSETRAIN_CACHE_DIR=.) made dlopen search the system's library
    # folders and Popen the PATH, so the build succeeded every time and was never found.
    path = cache_dir().absolute() / f"{source.stem}-{tag[:16]}{suffix}"
    if path.exists():
        _check_owned(path)
        return path
    # Writable by this user alone whatever the umask: under umask 002 the folder came out
    # group-writable, which _check_owned refused in every later process (every other rank).
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        cmd = [*cc, *flags, "-o", tmp, str(source)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"{shlex.join(cmd)} failed to run: {e}") from None
        if done.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(cmd)} exited with {done.returncode}: {done.stderr.strip()[-500:]}"
            )
        os.chmod(tmp, 0o755)  # (the linker's mode follows the umask)
        os.replace(tmp, path)  # atomic: a concurrent first use sees the old or the new file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _check_owned(path)  # as every later process will: all of them use it, or none
    return path
