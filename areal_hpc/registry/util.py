"""Small OS helpers every layer shares (here: the lowest layer that uses them): temp names and atomic file
writes, a free port, a live pid, whether a record's process runs on this host."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import signal
import socket
import sys
from typing import Optional, Union
from urllib.parse import urlsplit

_SEQ = itertools.count()
# looked up once: what runs between fork and exec (`preexec_fn`) must not load libraries
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def temp_name(name: str) -> str:
    """A hidden name beside ``name`` for a file or directory being written, unique to this call: the hostname and pid
    (writers on other hosts of a shared file system may have the same pid) and a count within the process."""
    return f".{name}.{socket.gethostname()}.{os.getpid()}.{next(_SEQ)}.tmp"


def own_temp(tmp: str, name_re: str) -> bool:
    """Whether ``tmp`` is a `temp_name` this process made for a name that matches the regex ``name_re``."""
    mine = rf"\.(?:{name_re})\.{re.escape(socket.gethostname())}\.{os.getpid()}\.\d+\.tmp"
    return re.fullmatch(mine, tmp) is not None


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes], mode: int = 0o666, fsync: bool = False) -> str:
    """Write ``data`` to ``path`` through a temp file in the same directory and ``os.replace``: a reader sees the old
    file or the new one, never half of one. Mode: ``mode`` less the umask; ``fsync``: on disk before the rename."""
    path = os.fspath(path)
    d, name = os.path.split(path)
    tmp = os.path.join(d, temp_name(name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object writes all of ``data`` (one os.write may write less)
            f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (``""``: every interface). Another process may take it before the caller
    binds it; callers that cannot retry should keep the socket instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def address_towards(url: str) -> str:
    """This host's address on the route to ``url``'s host: where a peer there can connect back to (the weight group's
    rendezvous). ``gethostbyname(gethostname())`` may be 127.0.1.1 (Debian's /etc/hosts) or another network's."""
    host = urlsplit(url).hostname or "127.0.0.1"
    try:
        family = socket.getaddrinfo(host, None)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # a datagram socket sends nothing: this only picks the route
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def pid_alive(pid: Optional[int]) -> bool:
    """A live (not zombie) process on this host."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    try:  # an exited child its parent has not reaped yet still answers kill(0)
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def set_parent_death_signal(sig: int) -> bool:
    """Linux: this process gets ``sig`` when the thread that started it ends (PR_SET_PDEATHSIG); whether it could."""
    if _PRCTL is not None:
        _PRCTL(1, int(sig), 0, 0, 0)
    return _PRCTL is not None


def die_with_parent(parent: Optional[int] = None) -> None:
    """Linux: this process gets SIGKILL when its parent ends, however it ends (a SIGKILLed trainer's children would
    live on as orphans); exit now if the parent, pid ``parent``, is already gone."""
    set_parent_death_signal(signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def runs_here(*names: Optional[str]) -> bool:
    """Whether a record's host or node (any of ``names``) is this host: only then is its pid a process here. Records
    name hosts by ``gethostname()``, not ``getfqdn()`` (it may ask DNS, and hang, or say "localhost")."""
    return socket.gethostname() in names
