"""Provisioned parties: what travels between the parties of a `--distributed` run authenticated and encrypted,
what they write to the rendezvous store signed ([secure] extra: cryptography).

    python bench.py --provision kits --sites 3             # kits/server, kits/client-0, ...: one per party
    python bench.py --distributed --key kits               # every party on this machine, each with its kit
    torchrun ... bench.py --distributed --key kits/client-1  # one party per machine, with its own kit alone

A kit (`provision`) holds its party's Ed25519 signing key, every party's public key and the federation's id:
nothing secret of another party's. A run with kits does not use gloo: the parties make a mesh of their own
(`mesh`), one TCP connection per pair, each party listening on its own address alone (the server on
MASTER_ADDR's, a client on the one that faces it) until every peer has joined. On each connection:

1. The handshake (`connect_peer`, `answer_peer`): the party of the higher rank connects and sends its rank,
   a fresh X25519 key and its signature over them, the federation, the run's session and both ranks; the
   other answers with a fresh X25519 key of its own, signed over all of that. Each end checks the other's
   signature with the public key its kit holds for that rank: a stranger cannot join, and a party cannot
   speak for another. Both derive (HKDF-SHA256 over the X25519 secret) one key per direction, which only the
   two ends hold and no other run uses; the connecting end proves it holds its key with a first sealed
   message, and only then does the listener take it for that party.
2. The channel (`Channel`): every message is sealed with AES-GCM in pieces of at most a MiB, each with a
   16-byte tag (`overhead`); the nonce is a counter per direction, never sent, so that a piece changed,
   replayed, reordered or dropped fails authentication and the run stops in one line. The receiver reads
   the size the schedule expects and no more, and the sender's header (`distributed.Wire`) is opened and
   compared with the schedule before the payload is allocated.

The store (torch's TCPStore, which anyone who reaches its port can read and write) carries no data: liveness,
failure lines, the parties' measurements, the mesh's addresses. Each party first announces its kit's federation
there (`same_federation`, unsigned: a kit of another provisioning cannot sign for this one), so that a party
started with another provisioning's kit is named at once, by itself and by the others. Every other value is signed
by its writer over the key, the run's session and the value (`SignedStore`); one that fails is never believed, and
the run stops with "the rendezvous store was tampered with". The session is a random id of the server's, so that
values of an earlier run replayed in this one fail too. A stranger who reaches the ports can still flood them,
delete keys or make the run stop (an announcement of another federation among the ways), but only in the parties'
own words; it cannot join, read or forge.
"""
import json
import os
import queue
import socket
import struct
import threading
import time
from datetime import timedelta

from checkpoints import written

try:
    from cryptography.exceptions import InvalidSignature, InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
except ImportError:
    AESGCM = None

CHUNK, TAG = 1 << 20, 16  # a message is sealed in pieces of at most CHUNK bytes, each with a TAG
MAGIC = b"splitmed-mesh-1\0"
HANDSHAKE_SECONDS = 30.0  # the longest a connection may take to prove who it is
HELLO, ANSWER = len(MAGIC) + 4 + 32 + 64, 32 + 64  # bytes: magic, ranks, X25519 key, signature


class AuthenticationFailed(Exception):
    """A message or a value in the store failed authentication: the run stops, believing nothing of it."""


class OtherFederation(ValueError):
    """A party holds a kit of another provisioning than this one's."""


def party_name(rank):
    return "server" if rank == 0 else f"client {rank - 1}"


def kit_name(rank):
    """A party's kit's file name in the folder `provision` writes: "server", "client-0", ..."""
    return party_name(rank).replace(" ", "-")


def require(flag):
    if AESGCM is None:
        raise ValueError(f'{flag} needs cryptography: pip install -e ".[secure]"')


def overhead(size):
    """The bytes that sealing adds to a message of `size` bytes: a tag per piece."""
    return TAG * max(1, -(-size // CHUNK))


class Kit:
    """A party's credentials: its rank, its Ed25519 signing key, every party's public key, the federation."""

    def __init__(self, rank, signing_key, public_keys, federation):
        self.rank, self.signing_key, self.public_keys, self.federation = rank, signing_key, public_keys, federation

    def sign(self, message):
        return self.signing_key.sign(message)

    def verify(self, rank, signature, message):
        """Whether `signature` is party `rank`'s over `message`."""
        try:
            self.public_keys[rank].verify(bytes(signature), bytes(message))
            return True
        except InvalidSignature:
            return False


def raw(public_key):
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def provision(folder, num_parties):
    """Write one kit per party into `folder` (a new federation); returns their paths. Each file is readable by
    its owner alone; copy each to its party's machine, and keep no other party's there."""
    require("--provision")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.stat(folder).st_uid != os.getuid():  # its owner could replace a kit, or read one, before it is copied away
        raise ValueError(f"--provision {folder} belongs to another user (uid {os.stat(folder).st_uid}): provision into "
                         f"a folder of your own")
    paths = [os.path.join(folder, kit_name(rank)) for rank in range(num_parties)]
    if any(os.path.exists(path) for path in paths):
        raise ValueError(f"--provision {folder} already holds kits: a new federation goes into a new folder")
    federation = os.urandom(16).hex()
    signing_keys = [Ed25519PrivateKey.generate() for _ in range(num_parties)]
    public_keys = [raw(key.public_key()).hex() for key in signing_keys]
    for rank, (path, key) in enumerate(zip(paths, signing_keys)):
        with written(path) as file:
            json.dump(dict(party=party_name(rank), rank=rank, federation=federation, public_keys=public_keys,
                           signing_key=key.private_bytes_raw().hex()), file, indent=1)
    return paths


def load_kit(path, rank, world_size):
    """This party's kit: `path` is its kit's file, or the folder of every party's (`provision`'s)."""
    require("--key")
    if os.path.isdir(path):
        path = os.path.join(path, kit_name(rank))
    try:
        with open(path) as file:
            mode = os.fstat(file.fileno()).st_mode & 0o777
            if mode & 0o077:  # (its signing key is the party's identity: a kit others can read is no longer its own)
                raise ValueError(f"--key {path} can be read by others (mode {mode:o}): chmod 600 it, or provision anew")
            kit = json.load(file)
        signing_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(kit["signing_key"]))
        public_keys = [Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)) for key in kit["public_keys"]]
        owner, federation = kit["rank"], bytes.fromhex(kit["federation"])
        if type(owner) is not int or not 0 <= owner < len(public_keys):
            raise ValueError(f"its rank {str(owner)[:20]} is not one of its {len(public_keys)} parties")
        if raw(signing_key.public_key()) != raw(public_keys[owner]):
            raise ValueError("its signing key is not its party's")
    except OSError as error:
        raise ValueError(f"--key {path}: {error.strerror or error}") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError, OverflowError) as error:
        if str(error).startswith("--key"):
            raise
        raise ValueError(f"--key {path} is not a kit written by --provision ({str(error)[:80]})") from None
    if owner != rank:
        raise ValueError(f"--key {path} is {party_name(owner)}'s kit, and this process is {party_name(rank)} "
                         f"(RANK {rank})")
    if len(public_keys) != world_size:
        raise ValueError(f"--key {path} is a kit of a federation of {len(public_keys)} parties, and this run has "
                         f"{world_size}")
    return Kit(rank, signing_key, public_keys, federation)


def check_kits(folder, world_size):
    """The launcher's look at every party's kit in `folder` before it starts anything: each loads (`load_kit`) and
    all are of one federation, with the same parties' keys. A kit of another provisioning: ValueError naming it."""
    kits = [load_kit(folder, rank, world_size) for rank in range(world_size)]
    for kit in kits[1:]:
        if kit.federation != kits[0].federation or [raw(key) for key in kit.public_keys] != [
                raw(key) for key in kits[0].public_keys]:
            raise ValueError(f"--key {os.path.join(folder, kit_name(kit.rank))} is a kit of another federation than "
                             f"{os.path.join(folder, kit_name(0))}'s (federation {kit.federation.hex()[:8]}..., not "
                             f"{kits[0].federation.hex()[:8]}...): provision them together")
    return kits


class SignedStore:
    """The rendezvous store with each value signed by its writer (over the key, the session and the value) and
    checked on every read. A key that ends in a rank ("alive/2") is that party's alone to write."""

    def __init__(self, store, kit, session=b""):
        self.store, self.kit, self.session = store, kit, session

    def _signed(self, key, value):
        return b"store\0" + self.kit.federation + self.session + key.encode() + b"\0" + value

    def set(self, key, value):
        value = value.encode() if isinstance(value, str) else value
        self.store.set(key, struct.pack(">H", self.kit.rank) + self.kit.sign(self._signed(key, value)) + value)

    def get(self, key):
        stored = self.store.get(key)
        writer = struct.unpack(">H", stored[:2])[0] if len(stored) >= 66 else None
        owner = key.rsplit("/", 1)[-1]
        if (writer is None or writer >= len(self.kit.public_keys) or (owner.isdigit() and int(owner) != writer)
                or not self.kit.verify(writer, stored[2:66], self._signed(key, stored[66:]))):
            raise AuthenticationFailed(f"the rendezvous store was tampered with: {key!r} failed authentication")
        return stored[66:]

    def check(self, keys):
        return self.store.check(keys)

    def wait(self, keys):
        self.store.wait(keys)


def same_federation(store, kit, world_size, timeout):
    """Every party announces its kit's federation in the store and waits until all have, up to `timeout` seconds; a
    party of another federation is named at once (OtherFederation), by itself (the federation it expected, its
    kit's, and the one it met, the server's) and by the others. The announcement is not signed (a kit of another
    provisioning cannot sign for this one), so a stranger can make one too: the line says "announces"."""
    mine, announced = kit.federation.hex(), {}
    store.set(f"federation/{kit.rank}", mine)
    deadline = time.monotonic() + timeout
    while True:
        for peer in sorted(set(range(world_size)) - announced.keys()):
            if store.check([f"federation/{peer}"]):
                theirs = store.get(f"federation/{peer}")
                if len(theirs) != 32 or not set(theirs) <= set(b"0123456789abcdef"):  # (else the stranger's words)
                    raise AuthenticationFailed(f"the rendezvous store was tampered with: 'federation/{peer}' is no "
                                               f"federation's id")
                announced[peer] = theirs.decode()
        server = announced.get(0)  # the federation a client expects: the server's (until it announces, none)
        if server is not None and server != mine:
            raise OtherFederation(f"{party_name(kit.rank)}: its kit is of federation {mine[:8]}..., and the server's "
                                  f"of {server[:8]}...: every party's kit comes from one --provision")
        other = next((peer for peer, theirs in announced.items() if theirs != mine), None)
        if server is not None and other is not None:
            raise OtherFederation(f"{party_name(kit.rank)}: {party_name(other)} announces a kit of federation "
                                  f"{announced[other][:8]}..., not this one's ({mine[:8]}...): every party's kit comes "
                                  f"from one --provision")
        if len(announced) == world_size:
            return
        if time.monotonic() > deadline:
            missing = [party_name(peer) for peer in range(world_size) if peer not in announced]
            raise TimeoutError(f"{', '.join(missing)} did not join within {timeout:g} s")
        time.sleep(0.05)


def session_of(kit, store):
    """The run's session: a random id the server makes and signs, the others read. The server keeps its own and never
    reads it back: an earlier run's (signed by the same key) written over it can mislead a client, whose values
    then fail the server's authentication, named; never the server, whose reading of this run's values it would
    otherwise make the earlier run's."""
    signed = SignedStore(store, kit)
    if kit.rank == 0:
        session = os.urandom(16)
        signed.set("session/0", session)
        return session
    return signed.get("session/0")


class Sending:
    """A message on its way (`Channel.isend`), as torch's Work: `wait(timedelta)` and `is_completed()`."""

    def __init__(self):
        self.done, self.error = threading.Event(), None

    def finish(self, error):
        self.error = error
        self.done.set()

    def is_completed(self):
        if self.done.is_set() and self.error:
            raise self.error
        return self.done.is_set()

    def wait(self, timeout):
        if not self.done.wait(timeout.total_seconds()):
            raise TimeoutError(f"a message was not taken within {timeout.total_seconds():.0f} s")
        if self.error:
            raise self.error


class Channel:
    """One end of a connection to `peer` after the handshake: messages sealed with `send_key`, in order, by a
    thread of its own (a send does not wait: as gloo's), and opened with `receive_key` as they are read."""

    def __init__(self, connection, peer, send_key, receive_key, sent=0, received=0):
        self.connection, self.peer = connection, peer
        self.sealing, self.opening = AESGCM(send_key), AESGCM(receive_key)
        self.sent, self.received = sent, received  # the nonces: pieces sealed and opened so far
        self.outbox = queue.Queue()
        self.sender = threading.Thread(target=self._send_all, daemon=True)
        self.sender.start()

    def isend(self, data):
        """Queue `data` (bytes-like, not changed until sent) to be sealed and sent; returns its `Sending`."""
        sending = Sending()
        self.outbox.put((memoryview(data).cast("B"), sending))
        return sending

    def seal(self, data):
        """`data` sealed, piece by piece (each with the next nonce)."""
        for start in range(0, max(len(data), 1), CHUNK):
            self.sent += 1
            yield self.sealing.encrypt(self.sent.to_bytes(12, "big"), data[start:start + CHUNK], None)

    def _send_all(self):
        failure = None
        while (item := self.outbox.get()) is not None:
            data, sending = item
            try:
                if failure is None:
                    for sealed in self.seal(data):
                        self.connection.sendall(sealed)
            except Exception as error:  # (the connection lost: this message and every later one fail)
                failure = error
            sending.finish(failure)

    def receive_into(self, view):
        """Read, open and place the message of exactly len(`view`) bytes that the schedule expects next."""
        for start in range(0, max(len(view), 1), CHUNK):
            size = min(CHUNK, len(view) - start)
            sealed = receive_exactly(self.connection, size + TAG)
            self.received += 1
            try:
                view[start:start + size] = self.opening.decrypt(self.received.to_bytes(12, "big"), sealed, None)
            except InvalidTag:
                raise AuthenticationFailed(f"a message from {party_name(self.peer)} failed authentication (changed, "
                                           f"replayed or not from {party_name(self.peer)})") from None

    def close(self, timeout=60.0):
        self.outbox.put(None)
        self.sender.join(timeout)
        self.connection.close()


def receive_exactly(connection, size):
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        count = connection.recv_into(view[got:])
        if not count:
            raise ConnectionError("the connection was closed")
        got += count
    return buffer


def keys(kit, session, connecting, listening, transcript, shared):
    """(the connecting end's send key, the listening end's send key), from the X25519 `shared` secret."""
    derived = HKDF(hashes.SHA256(), 64, salt=session,
                   info=b"splitmed keys\0" + kit.federation + struct.pack(">HH", connecting, listening) + transcript)
    okm = derived.derive(shared)
    return okm[:32], okm[32:]


def connect_peer(kit, session, peer, address, timeout):
    """A channel to the lower-ranked `peer` listening at `address`, after the handshake (module docstring)."""
    connection = socket.create_connection(address, timeout=HANDSHAKE_SECONDS)
    mine = X25519PrivateKey.generate()
    hello = MAGIC + struct.pack(">HH", kit.rank, peer) + raw(mine.public_key())
    signature = kit.sign(b"hello\0" + kit.federation + session + hello)
    connection.sendall(hello + signature)
    answer = receive_exactly(connection, ANSWER)
    if not kit.verify(peer, answer[32:], b"answer\0" + kit.federation + session + hello + answer[:32]):
        connection.close()
        raise AuthenticationFailed(f"{party_name(peer)}'s answer at {address[0]}:{address[1]} failed authentication "
                                   f"(not {party_name(peer)}, or another run's)")
    shared = mine.exchange(X25519PublicKey.from_public_bytes(bytes(answer[:32])))
    send_key, receive_key = keys(kit, session, kit.rank, peer, hello + answer[:32], shared)
    channel = Channel(connection, peer, send_key, receive_key)
    channel.isend(b"confirm").wait(timedelta(seconds=HANDSHAKE_SECONDS))
    connection.settimeout(timeout)
    return channel


def answer_peer(connection, kit, session):
    """The listening end's handshake: (the peer's rank, its channel) once it has proved who it is, else raises."""
    connection.settimeout(HANDSHAKE_SECONDS)
    hello = receive_exactly(connection, HELLO)
    peer, me = struct.unpack(">HH", hello[len(MAGIC):len(MAGIC) + 4])
    signed = b"hello\0" + kit.federation + session + hello[:-64]
    if (hello[:len(MAGIC)] != MAGIC or me != kit.rank or not kit.rank < peer < len(kit.public_keys)
            or not kit.verify(peer, hello[-64:], signed)):
        raise AuthenticationFailed("a connection failed authentication")
    mine = X25519PrivateKey.generate()
    answer = raw(mine.public_key())
    connection.sendall(answer + kit.sign(b"answer\0" + kit.federation + session + hello[:-64] + answer))
    shared = mine.exchange(X25519PublicKey.from_public_bytes(bytes(hello[-96:-64])))
    receive_key, send_key = keys(kit, session, peer, kit.rank, bytes(hello[:-64]) + answer, shared)
    channel, confirm = Channel(connection, peer, send_key, receive_key), bytearray(7)
    try:
        channel.receive_into(memoryview(confirm))  # (the connecting end holds its key: the handshake was no replay)
        if confirm != b"confirm":
            raise AuthenticationFailed("a connection failed authentication")
    except BaseException:
        channel.close()
        raise
    return peer, channel


def own_address(master):
    """The address this party listens on: MASTER_ADDR's own for the server, for a client the one of its
    interfaces that faces MASTER_ADDR (the route is looked up; no packet is sent)."""
    family, _, _, _, address = socket.getaddrinfo(master, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        return probe.getsockname()[0]


def mesh(kit, store, master, timeout, session):
    """{rank: Channel} to every other party: this party listens on its own address (`own_address`; for the
    higher ranks, until all of them have joined) and connects to the lower ranks at the addresses they signed
    into the `SignedStore`. A connection that fails the handshake (a stranger's, garbage) is closed and
    counted, and the listening goes on."""
    world_size = len(kit.public_keys)
    host = socket.getaddrinfo(master, None, type=socket.SOCK_STREAM)[0][4][0] if kit.rank == 0 else own_address(master)
    joined, failures, changed = {}, [], threading.Condition()
    listener = None
    if kit.rank < world_size - 1:
        listener = socket.create_server((host, 0), family=socket.getaddrinfo(host, 0)[0][0], backlog=128)
        listener.settimeout(1.0)
        threading.Thread(target=listen, args=(listener, kit, session, joined, failures, changed), daemon=True).start()
        store.set(f"mesh/{kit.rank}", f"{host} {listener.getsockname()[1]}")
    channels = {}
    for peer in range(kit.rank):
        peer_host, port = store.get(f"mesh/{peer}").decode().rsplit(" ", 1)
        channels[peer] = connect_peer(kit, session, peer, (peer_host, int(port)), timeout)
    deadline = time.monotonic() + timeout
    with changed:
        while len(joined) < world_size - 1 - kit.rank and changed.wait(max(deadline - time.monotonic(), 0)):
            pass
        missing = [rank for rank in range(kit.rank + 1, world_size) if rank not in joined]
        channels.update(joined)
    if listener:
        listener.close()
    if missing:
        names = ", ".join(map(party_name, missing))
        raise (AuthenticationFailed if failures else TimeoutError)(
            f"{names} did not join {party_name(kit.rank)} within {timeout:.0f} s"
            + (f"; {len(failures)} connections to it failed authentication" if failures else ""))
    return channels


def listen(listener, kit, session, joined, failures, changed):
    """Take connections until the listener closes, each handshake in a thread of its own (a stranger's silent
    connection holds up no one)."""
    def handshake(connection):
        try:
            peer, channel = answer_peer(connection, kit, session)
        except (AuthenticationFailed, OSError, ValueError) as error:
            connection.close()
            with changed:
                failures.append(str(error))
            return
        with changed:
            if peer in joined:
                channel.close()
            else:
                joined[peer] = channel
            changed.notify_all()
    while True:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:  # closed: every peer has joined
            return
        threading.Thread(target=handshake, args=(connection,), daemon=True).start()


class Mesh:
    """The wire's messages (`distributed.Wire`) over the channels `mesh` made: the same calls as gloo's."""

    def __init__(self, channels):
        self.channels = channels

    def isend(self, tensor, peer):
        return self.channels[peer].isend(tensor.numpy())

    def recv(self, buffer, peer, timeout):
        self.channels[peer].connection.settimeout(timeout.total_seconds())
        self.channels[peer].receive_into(memoryview(buffer.numpy()).cast("B"))
        return buffer

    def overhead(self, size):
        return overhead(size)

    def close(self):
        for channel in self.channels.values():
            channel.close()
