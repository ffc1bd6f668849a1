"""Follow log files as tail -F does, keeping how far the peer got (--follow,
--state of send_events_cybertrace.py).

Each followed path is read as it grows, across rotation by rename (the old
file is read until its writer has moved on, then the new one from its
start), copytruncate
(the file shrinks below the position read: read again from 0), files that
appear later and files removed.  Only whole lines go out; a last line
waits for its newline.

Positions are saved only for what the peer acknowledged.  Every block
handed out is numbered by the events before it, with its file and the
offset where it ends; once the sender says that the first N events were
acknowledged, every block ending at or before N is done, and the saved
position of its path is that block's end: the start of the first event not
acknowledged.  A file is known again by its identity: device, inode, and a
SHA-256 of its first bytes (HEAD_BYTES, or all of a shorter file, so that
a file appended to keeps its identity), against an inode reused.

The state file is JSON, written atomically (a temporary file, fsync,
rename, fsync of its folder) at most once a second and on exit.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import stat
import time
from typing import Callable, Dict, Iterator, List, Optional

try:
    import fcntl
except ImportError:  # Windows: no flock; one sender per state is on trust
    fcntl = None

# How much of a file's start tells it from another: enough for a few log
# lines with their timestamps.
HEAD_BYTES = 1024
# A head this short could be any file's: a rotated copy is looked for by
# its head alone only from here.
MATCH_HEAD_BYTES = 256
READ_SIZE = 256 * 1024
POLL_SECONDS = 0.2
SAVE_SECONDS = 1.0
# A file renamed away is read on until its writer has moved on: until the
# new file gets a line, or the old one is removed, or it has had nothing
# new for this long.  logrotate's `create` makes the new file before the
# writer reopens (postrotate), and what it writes meanwhile goes to the
# old one; Filebeat keeps reading a renamed file for 5 minutes idle.
ROTATED_QUIET_SECONDS = 60.0
STATE_VERSION = 1


class StateError(Exception):
    """The state file cannot be read or written (one line, for the user)."""


class Identity:
    """Which file a position belongs to: device, inode and head hash."""

    __slots__ = ("device", "inode", "head_bytes", "head_sha256")

    def __init__(self, device: int, inode: int, head_bytes: int = 0,
                 head_sha256: str = "") -> None:
        self.device = device
        self.inode = inode
        self.head_bytes = head_bytes
        self.head_sha256 = head_sha256 or hashlib.sha256(b"").hexdigest()

    @classmethod
    def of(cls, fd: int) -> "Identity":
        """Return the identity of an open file, its head as it is now."""
        info = os.fstat(fd)
        identity = cls(info.st_dev, info.st_ino)
        identity.grow(fd)
        return identity

    def grow(self, fd: int) -> None:
        """Take more of the head, up to HEAD_BYTES, if the file has it."""
        if self.head_bytes >= HEAD_BYTES:
            return
        head = os.pread(fd, HEAD_BYTES, 0)
        if len(head) > self.head_bytes and hashlib.sha256(
                head[:self.head_bytes]).hexdigest() == self.head_sha256:
            self.head_bytes = len(head)
            self.head_sha256 = hashlib.sha256(head).hexdigest()

    def same_head(self, fd: int) -> bool:
        """Tell whether an open file starts with this identity's head."""
        head = os.pread(fd, self.head_bytes, 0) if self.head_bytes else b""
        return len(head) == self.head_bytes and \
            hashlib.sha256(head).hexdigest() == self.head_sha256

    def same_inode(self, info: os.stat_result) -> bool:
        return (info.st_dev, info.st_ino) == (self.device, self.inode)

    def record(self) -> dict:
        return {"device": self.device, "inode": self.inode,
                "head_bytes": self.head_bytes,
                "head_sha256": self.head_sha256}

    @classmethod
    def from_record(cls, record: dict) -> "Identity":
        """Return the identity a state entry holds; ValueError if damaged."""
        values = [record.get(name) for name in (
            "device", "inode", "head_bytes", "head_sha256")]
        if not all(isinstance(value, int) and not isinstance(value, bool)
                   and value >= 0 for value in values[:3]) or \
                not isinstance(values[3], str) or len(values[3]) != 64 or \
                values[2] > HEAD_BYTES:
            raise ValueError("bad identity")
        return cls(*values)


class Opening:
    """One file opened for a path, read from offset on."""

    def __init__(self, fd: int, identity: Identity, offset: int,
                 framer) -> None:
        self.fd = fd
        self.identity = identity
        self.offset = offset  # the next byte to read
        self.framer = framer
        self.start = offset  # where the framer's count starts
        self.handed = offset  # where the next block handed out starts
        self.closed = False
        self.active = time.monotonic()  # when it last had something new

    @property
    def framed(self) -> int:
        """Return the offset after the last whole event handed out."""
        return self.start + self.framer.received - len(self.framer.pending)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class FollowedPath:
    """A path as tail -F follows it: the file there now, and any it was
    before (rotated) that is still to be read to its end."""

    def __init__(self, path: str, shown: str) -> None:
        self.path = path
        self.shown = shown
        self.openings: List[Opening] = []  # oldest first; the last is current
        self.missing_said = False
        self.error_said = ""

    @property
    def current(self) -> Optional[Opening]:
        return self.openings[-1] if self.openings else None


class Follower:
    """Follow paths and hand out their new whole lines as blocks.

    warn and status print a line for the user; make_framer returns a fresh
    framer (the sender's, so that lines are cut as for any file);
    frame(block) returns (block, events) as the sender counts them;
    split(shown) is told of a file whose framer cut a long line.
    """

    def __init__(self, paths: List[str], shown: Callable[[str], str],
                 make_framer: Callable, frame: Callable,
                 warn: Callable[[str], None],
                 status: Callable[[str], None],
                 state_path: Optional[str] = None,
                 from_start: bool = False,
                 poll: float = POLL_SECONDS,
                 split: Callable[[str], None] = lambda shown: None,
                 rotated_quiet: float = ROTATED_QUIET_SECONDS) -> None:
        self.make_framer = make_framer
        self.split = split
        self.frame = frame
        self.warn = warn
        self.status = status
        self.state_path = state_path
        self.from_start = from_start
        self.poll = poll
        self.rotated_quiet = rotated_quiet
        self.paths = [FollowedPath(os.path.abspath(path), shown(path))
                      for path in paths]
        # Events handed out, numbered from 0 as the sender counts them.
        self.numbered = 0
        # (events before the block's end, path, identity, offset after it)
        self.marks = collections.deque()
        # path: (identity, offset) acknowledged, or the saved one
        self.done: Dict[str, Optional[tuple]] = {}
        self.carried = {}  # entries of the state for paths not followed
        self.acknowledged: Optional[Callable[[], int]] = None
        # Called while no file has anything new: raises (or reconnects)
        # once the peer is gone, which otherwise shows only at the next
        # line, maybe hours away.
        self.check: Optional[Callable[[], None]] = None
        self.acked = 0
        self.saved_at = 0.0
        self.changed = False
        self.closed = False
        self.lock_fd = lock_state(state_path)
        try:
            saved = self.load()
            for followed in self.paths:
                self.begin(followed, saved)
            if self.state_path is not None:
                # Written at once: a state folder we cannot write fails
                # now, not after an hour of sending.
                self.save(force=True)
        except BaseException:
            self.close_files()
            raise

    # --- the state file ---------------------------------------------------

    def load(self) -> Optional[dict]:
        """Return the saved entries by path; None without a usable state."""
        if self.state_path is None:
            return None
        try:
            with open(self.state_path, "rb") as file:
                data = file.read(16 * 1024 * 1024)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError("cannot read %s: %s" % (
                self.state_path, exc.strerror)) from None
        try:
            record = json.loads(data.decode("utf-8"))
            if not isinstance(record, dict) or \
                    record.get("version") != STATE_VERSION or \
                    not isinstance(record.get("files"), dict):
                raise ValueError("not a state file of this version")
            entries = {}
            for path, entry in record["files"].items():
                offset = entry.get("offset") if isinstance(entry, dict) \
                    else None
                if not isinstance(offset, int) or isinstance(offset, bool) \
                        or offset < 0:
                    raise ValueError("bad offset")
                entries[path] = (Identity.from_record(entry), offset)
                self.carried[path] = entry
        except (ValueError, UnicodeError, AttributeError) as exc:
            self.carried = {}
            # It is written over next: what it held stays there to look at
            # (a file given as --state by mistake too).
            kept = self.state_path + ".damaged"
            write_atomically(kept, data)
            self.warn("--state %s is damaged (%s; kept as %s): starting "
                      "each file at its %s" % (
                          self.state_path, exc, kept,
                          "start (--from-start)" if self.from_start
                          else "end (--from-start: at its start)"))
            return None
        for followed in self.paths:
            self.carried.pop(followed.path, None)
        return entries

    def save(self, force: bool = False) -> None:
        """Write the acknowledged positions, at most once a second."""
        if self.state_path is None:
            return
        now = time.monotonic()
        if not force and (not self.changed or
                          now - self.saved_at < SAVE_SECONDS):
            return
        self.within_block()
        files = dict(self.carried)
        for followed in self.paths:
            position = self.done.get(followed.path)
            if position is not None:
                identity, offset = position
                files[followed.path] = dict(identity.record(),
                                            offset=offset)
        data = json.dumps({"version": STATE_VERSION, "files": files},
                          indent=1, sort_keys=True).encode() + b"\n"
        write_atomically(self.state_path, data)
        self.saved_at = now
        self.changed = False

    def within_block(self) -> None:
        """Move a path's position past the acknowledged events of the first
        block only partly acknowledged: read again, its lines say where."""
        if not self.marks:
            return
        _, path, identity, end, opening, start, first = self.marks[0]
        acked = self.acked - first
        if acked <= 0 or opening is None or opening.closed or \
                opening.identity is not identity:
            return
        try:
            data = os.pread(opening.fd, end - start, start)
        except OSError:
            return
        offset = start + acknowledged_bytes(
            data, acked, opening.framer.max_event_bytes)
        done = self.done.get(path)
        if done is not None and done[0] is identity and offset > done[1]:
            self.done[path] = (identity, offset)

    # --- where each path starts -------------------------------------------

    def begin(self, followed: FollowedPath, saved: Optional[dict]) -> None:
        """Open a path where its saved position says, or at its end (its
        start with --from-start)."""
        fd = self.open(followed)
        entry = saved.get(followed.path) if saved else None
        if entry is None:
            self.done[followed.path] = None
            if fd is None:
                self.status("Following %s: %s; read from its start once "
                            "it %s" % ((followed.shown,) + (
                                ("it cannot be read", "can")
                                if followed.error_said else
                                ("it does not exist yet", "does"))))
                return
            if saved is not None and self.state_path is not None and \
                    not self.from_start:
                why = "no position saved in %s yet" % self.state_path
            else:
                why = ""
            self.start_at(followed, fd, None, why)
            return
        identity, offset = entry
        self.done[followed.path] = entry
        info = os.fstat(fd) if fd is not None else None
        if info is not None and identity.same_inode(info) and \
                identity.same_head(fd):
            if info.st_size >= offset:
                self.add(followed, fd, identity, offset)
                self.status("Following %s from byte %d (saved in %s)"
                            % (followed.shown, offset, self.state_path))
                return
            # Copied then truncated while we were away: the rest is in
            # the copy, if it is still there.
            if not self.resume_rotated(followed, identity, offset, True):
                self.warn("%s is shorter (%d bytes) than the position saved"
                          " (%d) and no copy of it was found: reading it "
                          "from its start" % (followed.shown, info.st_size,
                                              offset))
            self.add(followed, fd, Identity.of(fd), 0)
            return
        if self.resume_rotated(followed, identity, offset, False):
            if fd is not None:
                # Everything there was written after the rotation.
                self.add(followed, fd, Identity.of(fd), 0)
            return
        if fd is None:
            self.warn("%s %s, nor the file its saved position is of: "
                      "reading it from its start once it %s" % (
                          (followed.shown,) + (("cannot be read", "can")
                                               if followed.error_said else
                                               ("does not exist", "does"))))
            self.done[followed.path] = None
            return
        if info.st_dev == identity.device:
            # The file there was replaced (rotated, and the old one
            # compressed or removed, while we were stopped): all of the
            # new one came after, as Filebeat and imfile read a new inode.
            self.warn("%s was replaced since its position was saved, and "
                      "no file beside it is surely the one that position "
                      "is in (compressed, removed, or several copies "
                      "alike?): reading the new one from "
                      "its start; what the old one had after byte %d is "
                      "not sent" % (followed.shown, offset))
            identity = Identity.of(fd)
            self.done[followed.path] = (identity, 0)
            self.changed = True
            self.add(followed, fd, identity, 0)
            return
        self.start_at(followed, fd, "--state %s holds the position of "
                      "another file than %s (its device differs: a state "
                      "from another host or disk?)" % (self.state_path,
                                                      followed.shown), "")

    def start_at(self, followed: FollowedPath, fd: int,
                 warning: Optional[str], why: str) -> None:
        """Start a path at its end, or at its start with --from-start."""
        identity = Identity.of(fd)
        offset = 0 if self.from_start else os.fstat(fd).st_size
        where = "start (--from-start)" if self.from_start else \
            "end (--from-start: at its start)"
        if warning:
            self.warn("%s: starting at its %s" % (warning, where))
        else:
            self.status("Following %s from its %s%s" % (
                followed.shown, "start" if self.from_start else "end",
                " (%s)" % why if why else ""))
        self.done[followed.path] = (identity, offset)
        self.changed = True
        self.add(followed, fd, identity, offset)

    def resume_rotated(self, followed: FollowedPath, identity: Identity,
                       offset: int, copied: bool) -> bool:
        """Find the file a saved position is of beside its path and read
        it from there to its end first."""
        found = find_rotated(followed.path, identity, offset, copied)
        if found is None:
            return False
        fd, name, renamed = found
        self.add(followed, fd, identity, offset)
        self.status("Following %s from byte %d of %s, where it was %s, "
                    "then %s from its start" % (
                        followed.shown, offset, name,
                        "renamed" if renamed else "copied", followed.shown))
        return True

    def truncated(self, followed: FollowedPath,
                  opening: Opening) -> Iterator:
        """Read a file copied then truncated (copytruncate) again from its
        start, after the rest of what it had from its copy, if found."""
        found = find_rotated(followed.path, opening.identity,
                             opening.offset, True)
        if found is None:
            self.warn("%s was truncated and no copy of it was found: reading"
                      " it from its start (lines written after byte %d and "
                      "before it was truncated are not sent)"
                      % (followed.shown, opening.offset))
            yield from self.finish(followed, opening)
        else:
            fd, name, _ = found
            self.status("%s was truncated (copytruncate): reading the rest "
                        "from %s, then it from its start"
                        % (followed.shown, name))
            os.lseek(fd, opening.offset, os.SEEK_SET)
            copy = Opening(fd, opening.identity, opening.offset,
                           opening.framer)
            copy.start, copy.handed = opening.start, opening.handed
            followed.openings.insert(0, copy)
        os.lseek(opening.fd, 0, os.SEEK_SET)
        opening.identity = Identity.of(opening.fd)
        opening.offset = opening.start = opening.handed = 0
        opening.framer = self.make_framer()
        if found is None:
            self.mark(followed, opening.identity, 0)

    def open(self, followed: FollowedPath) -> Optional[int]:
        """Open the file at a path; None if it is not there (said once)."""
        try:
            fd = os.open(followed.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if followed.error_said != exc.strerror:
                followed.error_said = exc.strerror
                self.warn("cannot read %s: %s; trying again" % (
                    followed.shown, exc.strerror))
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            if followed.error_said != "not a file":
                followed.error_said = "not a file"
                self.warn("%s is not a regular file: not followed"
                          % followed.shown)
            return None
        followed.error_said = ""
        return fd

    def add(self, followed: FollowedPath, fd: int, identity: Identity,
            offset: int) -> None:
        os.lseek(fd, offset, os.SEEK_SET)
        followed.openings.append(Opening(fd, identity, offset,
                                         self.make_framer()))

    # --- following ----------------------------------------------------------

    def blocks(self) -> Iterator[tuple]:
        """Yield (block, events) of every path's new lines, for ever."""
        while True:
            idle = True
            for block, count in self.round():
                idle = False
                if count:
                    yield block, count
            if idle:
                if self.check is not None:
                    self.check()
                time.sleep(self.poll)

    def round(self) -> Iterator[tuple]:
        """Yield what each path has new, a read each; then take the
        acknowledgements."""
        for followed in self.paths:
            yield from self.read(followed)
        self.settle()

    def read(self, followed: FollowedPath) -> Iterator[tuple]:
        """Yield what a path's oldest file has new, then look for changes:
        rotation, truncation, removal."""
        opening = followed.openings[0] if followed.openings else None
        if opening is None:
            fd = self.open(followed)
            if fd is None:
                return
            if followed.missing_said:
                self.status("%s appeared; following it from its start"
                            % followed.shown)
            followed.missing_said = False
            identity = Identity.of(fd)
            self.mark(followed, identity, 0)
            self.add(followed, fd, identity, 0)
            return
        # Asked before the read: all that the writer put in the old file
        # before it wrote to the new one is read by then.
        moved_on = len(followed.openings) > 1 and \
            self.moved_on(opening, followed.openings[1])
        try:
            data = os.read(opening.fd, READ_SIZE)
        except OSError as exc:
            self.warn("cannot read %s: %s" % (followed.shown, exc.strerror))
            data = b""
        if data:
            opening.offset += len(data)
            opening.active = time.monotonic()
            opening.identity.grow(opening.fd)
            block, count = self.frame(opening.framer.feed(data))
            if opening.framer.split_events:
                self.split(followed.shown)
            yield self.hand_out(followed, opening, block, count)
            return
        if moved_on:
            # Read to its end, and its writer writes the newer file: this
            # one is done.
            yield from self.finish(followed, opening)
            followed.openings.pop(0)
            opening.close()
            self.mark(followed, followed.openings[0].identity,
                      followed.openings[0].offset)
            return
        if len(followed.openings) == 1:
            yield from self.look(followed, opening)

    def moved_on(self, old: Opening, new: Opening) -> bool:
        """Tell whether a file rotated away will get nothing more: the
        file after it has something, or it was removed, or it has been
        quiet for rotated_quiet seconds."""
        try:
            if os.fstat(new.fd).st_size > new.offset or \
                    os.fstat(old.fd).st_nlink == 0:
                return True
        except OSError:
            return True
        return time.monotonic() - old.active >= self.rotated_quiet

    def look(self, followed: FollowedPath, opening: Opening) -> Iterator:
        """At the end of the current file: notice truncation, rotation
        and removal."""
        info = os.fstat(opening.fd)
        if info.st_size < opening.offset or not \
                opening.identity.same_head(opening.fd):
            yield from self.truncated(followed, opening)
            return
        try:
            now = os.stat(followed.path)
        except OSError:
            now = None
        if now is not None and opening.identity.same_inode(now):
            return
        if now is None:
            if info.st_nlink == 0:
                # Removed for good: hold no deleted file open.
                yield from self.finish(followed, opening)
                followed.openings.pop(0)
                opening.close()
                self.status("%s was removed; following it again once it "
                            "is back" % followed.shown)
                followed.missing_said = True
            return
        fd = self.open(followed)
        if fd is None:
            return
        # Rotated: the old file is read to its end first.
        self.status("%s was rotated; reading the new file once the old "
                    "one is finished" % followed.shown)
        self.add(followed, fd, Identity.of(fd), 0)

    def finish(self, followed: FollowedPath, opening: Opening) -> Iterator:
        """Hand out a finished file's last line, which has no newline."""
        rest = opening.framer.close()
        if rest:
            block, count = self.frame(rest)
            yield self.hand_out(followed, opening, block, count,
                                opening.offset)

    def hand_out(self, followed: FollowedPath, opening: Opening, block,
                 count: int, end: Optional[int] = None) -> tuple:
        """Number a block and note where it starts and ends."""
        first, self.numbered = self.numbered, self.numbered + count
        start = opening.handed
        opening.handed = opening.framed if end is None else end
        self.marks.append((self.numbered, followed.path, opening.identity,
                           opening.handed, opening, start, first))
        return block, count

    def mark(self, followed: FollowedPath, identity: Identity,
             offset: int) -> None:
        """Note that once all handed out so far is acknowledged, the path
        is at offset of that file."""
        self.marks.append((self.numbered, followed.path, identity, offset,
                           None, offset, self.numbered))

    def settle(self, acked: Optional[int] = None) -> None:
        """Take the peer's acknowledgements; save now and then."""
        if acked is None and self.acknowledged is not None:
            acked = self.acknowledged()
        if acked is not None:
            self.acked = max(self.acked, acked)
        while self.marks and self.marks[0][0] <= self.acked:
            _, path, identity, offset = self.marks.popleft()[:4]
            self.done[path] = (identity, offset)
            self.changed = True
        self.save()

    def close(self, acked: Optional[int] = None) -> None:
        """Save the positions acknowledged (acked events, if given); close
        every file; again, nothing."""
        if self.closed:
            return
        self.closed = True
        try:
            if acked is not None:
                self.acked = max(self.acked, acked)
            self.acknowledged = self.check = None
            self.settle()
            self.save(force=True)
        finally:
            self.close_files()

    def close_files(self) -> None:
        for followed in self.paths:
            for opening in followed.openings:
                opening.close()
            followed.openings = []
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def lock_state(path: Optional[str]) -> Optional[int]:
    """Lock a state file for this sender (beside it, STATE.lock); return
    the lock's fd, or None where there is nothing to lock or no flock."""
    # Two senders on one state would each write over the other's
    # positions, and the next start would not know them: as Filebeat
    # locks its registry, the second one stops.
    if path is None or fcntl is None:
        return None
    name = path + ".lock"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        # Named as the user gave it: its folder is what is wrong.
        raise StateError("cannot write %s: %s" % (path, exc.strerror)) \
            from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StateError("--state %s is in use by another sender: give "
                         "each its own state file" % path) from None
    return fd


def find_rotated(path: str, identity: Identity, offset: int,
                 copied: bool) -> Optional[tuple]:
    """Find beside path the file a position is of, rotated: renamed (same
    inode and head) or, when copied (copytruncate), of the same head.
    Return (open fd, its name, whether renamed), or None."""
    folder, name = os.path.split(path)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return None
    # A head shorter than MATCH_HEAD_BYTES (a small file) tells a copy
    # only when no other file beside it starts alike: two could be copies
    # of a file that starts with the same header line.
    alike = []
    for entry in entries:
        if not entry.name.startswith(name) or entry.name == name:
            continue
        try:
            info = entry.stat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_size < offset:
            continue
        by_inode = identity.same_inode(info) and not copied
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        if not identity.same_head(fd):
            os.close(fd)
        elif by_inode or identity.head_bytes >= MATCH_HEAD_BYTES:
            for other, _, _ in alike:
                os.close(other)
            return fd, entry.name, by_inode
        else:
            alike.append((fd, entry.name, by_inode))
    if len(alike) == 1:
        return alike[0]
    for fd, _, _ in alike:
        os.close(fd)
    return None


def acknowledged_bytes(data: bytes, events: int, piece: int) -> int:
    """Return how many bytes of data, whole lines, hold no more than its
    first events events, counted as the sender frames them (a blank line
    is none, a line longer than piece bytes several)."""
    taken = count = 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        text = raw[:-1]
        # At least as many as the sender made of it: never too far.
        made = -(-len(text) // piece) if text.strip() else 0
        if count + made > events:
            break
        count += made
        taken += len(raw)
    return taken


def write_atomically(path: str, data: bytes) -> None:
    """Replace path with data so that a crash leaves the old or the new
    whole: a temporary file beside it, fsync, rename, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = "%s.%d.tmp" % (path, os.getpid())
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException as exc:
        # Ctrl+C too: no temporary file left behind.
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise StateError("cannot write %s: %s" % (
                path, exc.strerror)) from None
        raise
    try:
        # The rename itself survives a power cut only once its folder is
        # on disk.
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a folder; its rename is durable
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
