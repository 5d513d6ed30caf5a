"""What the daemon's intake needs to know of one inbox entry, and how it takes one across disks.

`open_for_writing` (a file still being written is never half-read), `special_file` (what a
link, pipe, socket or device in the inbox is, and the fix), and `claim_across` (an inbox on
another filesystem: copy, fsync, name, then remove the original, as `mv` does).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import shutil
import stat
import time
from pathlib import Path

import training_queue
import trainroot


def open_for_writing(path: str) -> bool:
    """True if some process has `path` open for writing (a read lease is refused then).

    Linux only and cheap (three syscalls). Where leases are unsupported (NFS, another
    owner without CAP_LEASE) it answers False and the settle interval alone decides.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EBUSY)
    finally:
        os.close(fd)


def special_file(path: str, root: Path) -> tuple[str, str] | None:
    """(reason, fix) for an inbox entry that is not a regular file, judged where it is (a
    relative link means something else once moved); None for a regular file or none."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    inbox = root / "inbox"
    save = f"Save the data as a regular .jsonl file and drop that into {shlex.quote(str(inbox))}/."
    if stat.S_ISLNK(mode):
        try:
            link = os.readlink(path)
        except OSError:
            link = "?"
        itself = f"Drop the file itself into {shlex.quote(str(inbox))}/, not a link to it."
        try:
            target_mode = os.stat(path).st_mode
        except FileNotFoundError:
            return f"not a regular file: a symbolic link to {link}, which does not exist", itself
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"not a regular file: a symbolic link loop ({link})", itself
            return (f"not a regular file: a symbolic link to {link}, which cannot be read "
                    f"({exc.strerror})", itself)
        target = os.path.realpath(path)
        if stat.S_ISREG(target_mode):
            return (f"not a regular file: a symbolic link to {target} (only a file itself is "
                    "taken: a link's target can change while it trains)",
                    f"`{training_queue.add_cmd(root, target)}` queues a copy of its content.")
        return f"not a regular file: a symbolic link to {target}, which is not a file", itself
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    return f"not a regular file: {kind}", save


def claim_across(src: str, directory: Path, sig: tuple | None) -> Path | None:
    """Take `src` from another filesystem into `directory` (rename(2) said EXDEV), as `mv`
    does across disks: copy under a hidden temp name, fsync, give the copy its name (never
    replacing one), and only then remove the original. A crash in between leaves it in the
    inbox as well, and the second copy is skipped as already trained: never in no place.

    Regular files and links (re-made with the same target) only; None for anything else,
    or when the file changed while it was copied (it settles and is taken later).
    """
    directory.mkdir(parents=True, exist_ok=True)
    st = os.lstat(src)
    name = os.path.basename(src)
    tmp = directory / f".claim-{os.getpid()}-{time.time_ns()}.tmp"   # hidden: never taken
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), tmp)
    elif stat.S_ISREG(st.st_mode):
        # O_NONBLOCK: a file swapped for a FIFO since it was looked at must not hang us
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            with open(fd, "rb", closefd=False) as f_in, open(tmp, "xb") as f_out:
                shutil.copyfileobj(f_in, f_out, 1 << 20)
                f_out.flush()
                os.fsync(f_out.fileno())
            after = os.fstat(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        now = (after.st_size, after.st_mtime_ns, after.st_ino)
        if not stat.S_ISREG(after.st_mode) or now != (sig or now) or \
                now != (st.st_size, st.st_mtime_ns, st.st_ino) or os.path.getsize(tmp) != after.st_size:
            os.unlink(tmp)
            return None
        shutil.copystat(src, tmp)  # its mode and mtime, as `mv` keeps them
    else:
        return None
    dst = trainroot.move_unique(tmp, directory, name=name)   # fsyncs the folder
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass  # removed meanwhile: the copy is the one left
    except OSError:  # a read-only drop folder: keep the original there, never two of it
        os.unlink(dst)
        raise
    return dst
