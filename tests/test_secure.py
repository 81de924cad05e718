"""Provisioned parties (secure.py): sealed messages, handshakes that only a kit's owner passes, a signed store,
and real runs with a stranger on every port the run listens on."""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
from datetime import timedelta

import bench
import launch
import secure
from test_distributed import DISTRIBUTED, process_group

pytestmark = pytest.mark.skipif(secure.AESGCM is None, reason="needs the [secure] extra (cryptography)")


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    """A federation of three parties: its folder, and each party's kit."""
    folder = tmp_path_factory.mktemp("kits") / "federation"
    secure.provision(str(folder), 3)
    return folder, [secure.load_kit(str(folder), rank, 3) for rank in range(3)]


def channels(send_key=b"k" * 32, receive_key=b"k" * 32):
    """Two ends of one connection: (the sending end's Channel, the receiving end's Channel, its raw socket)."""
    one, other = socket.socketpair()
    return secure.Channel(one, 1, send_key, b"x" * 32), secure.Channel(other, 2, b"y" * 32, receive_key), one


def test_a_sealed_message_arrives_bit_for_bit_and_one_changed_replayed_or_reordered_is_refused():
    sender, receiver, _ = channels()
    message = torch.randn(300_000).view(torch.uint8)  # 1.2 MB: two pieces
    sending, arrived = sender.isend(message.numpy()), torch.empty_like(message)
    receiver.receive_into(memoryview(arrived.numpy()))
    sending.wait(timedelta(seconds=10))
    assert torch.equal(arrived, message) and sender.sent == receiver.received == 2
    assert secure.overhead(len(message)) == 32 and secure.overhead(0) == secure.overhead(1) == 16
    for case in ("changed", "replayed", "reordered", "another key"):
        sender, receiver, raw = channels(receive_key=b"z" * 32 if case == "another key" else b"k" * 32)
        (first,), (second,) = sender.seal(memoryview(b"abc")), sender.seal(memoryview(b"def"))  # (as it would)
        if case == "replayed":
            raw.sendall(first)
            receiver.receive_into(memoryview(bytearray(3)))
        raw.sendall({"changed": bytes([first[0] ^ 1]) + first[1:], "reordered": second}.get(case, first))
        with pytest.raises(secure.AuthenticationFailed, match="a message from client 1 failed authentication"):
            receiver.receive_into(memoryview(bytearray(3)))


def handshake(listening_kit, connecting_kit, peer, session=b"s" * 16, connecting_session=None):
    """One handshake over loopback: (the listener's outcome, the connector's outcome), each a Channel's peer
    rank or the exception raised."""
    listener = socket.create_server(("127.0.0.1", 0))
    outcome = {}

    def answer():
        connection, _ = listener.accept()
        try:
            outcome["listener"] = secure.answer_peer(connection, listening_kit, session)[0]
        except Exception as error:
            outcome["listener"] = error
            connection.close()
    thread = threading.Thread(target=answer)
    thread.start()
    try:
        outcome["connector"] = secure.connect_peer(connecting_kit, connecting_session or session, peer,
                                                   listener.getsockname(), 10).peer
    except Exception as error:
        outcome["connector"] = error
    thread.join(30)
    listener.close()
    return outcome["listener"], outcome["connector"]


def test_only_a_kits_owner_passes_the_handshake_and_no_party_speaks_for_another(kits, tmp_path):
    folder, (server, client_0, client_1) = kits
    assert handshake(server, client_1, 0) == (2, 0)
    impostor = secure.Kit(2, client_0.signing_key, client_0.public_keys, client_0.federation)  # client 0 as client 1
    listened, connected = handshake(server, impostor, 0)
    assert isinstance(listened, secure.AuthenticationFailed) and not isinstance(connected, int)
    impostor = secure.Kit(0, client_0.signing_key, client_0.public_keys, client_0.federation)  # ... as the server
    listened, connected = handshake(impostor, client_1, 0)
    assert isinstance(connected, secure.AuthenticationFailed) and "server's answer" in str(connected)
    secure.provision(str(tmp_path / "other"), 3)
    stranger = secure.load_kit(str(tmp_path / "other"), 1, 3)  # a kit of another federation
    listened, connected = handshake(server, stranger, 0)
    assert isinstance(listened, secure.AuthenticationFailed) and not isinstance(connected, int)
    listened, connected = handshake(server, client_0, 0, connecting_session=b"t" * 16)  # another run's session
    assert isinstance(listened, secure.AuthenticationFailed) and not isinstance(connected, int)


def test_an_earlier_runs_session_written_over_this_ones_is_named_never_believed_by_the_server(kits):
    _, (server, client_0, _) = kits
    earlier, store = dist.HashStore(), dist.HashStore()
    secure.session_of(server, earlier)  # an earlier run of the same federation, as a stranger recorded it
    session = secure.session_of(server, store)
    store.set("session/0", earlier.get("session/0"))  # ... and wrote over this run's
    misled = secure.session_of(client_0, store)
    assert misled != session and misled == secure.session_of(client_0, earlier)
    secure.SignedStore(store, client_0, misled).set("alive/1", "0")
    with pytest.raises(secure.AuthenticationFailed, match="'alive/1' failed authentication"):
        secure.SignedStore(store, server, session).get("alive/1")


def test_the_signed_store_believes_no_value_forged_moved_replayed_or_written_for_another_party(kits):
    _, (server, client_0, client_1) = kits
    store, scratch = dist.HashStore(), dist.HashStore()

    def signed_value(writer, key, value, session=b"session-1"):
        secure.SignedStore(scratch, writer, session).set(key, value)
        return scratch.get(key)
    secure.SignedStore(store, client_0, b"session-1").set("alive/1", "7")
    assert secure.SignedStore(store, server, b"session-1").get("alive/1") == b"7"
    cases = [("alive/1", b"SPOOFED: client 1 failed"),  # forged
             ("alive/1", signed_value(client_0, "mesh/1", "7")),  # moved from another key
             ("alive/1", signed_value(client_0, "alive/1", "7", b"session-0")),  # replayed from an earlier run
             ("alive/2", signed_value(client_0, "alive/2", "7"))]  # client 0 writing client 1's key
    for key, value in cases:
        store.set(key, value)
        with pytest.raises(secure.AuthenticationFailed,
                           match=f"the rendezvous store was tampered with: '{key}' failed authentication"):
            secure.SignedStore(store, server, b"session-1").get(key)


def test_kits_without_the_extra_or_broken_are_one_line_and_exit_2(kits, tmp_path, monkeypatch, capsys):
    folder, _ = kits
    kit = json.loads((folder / "client-0").read_text())
    kits_of = {"broken": json.dumps(dict(kit, rank=2)), "huge": json.dumps(kit).replace('"rank": 1', '"rank": 1e400'),
               "negative": json.dumps(dict(kit, rank=-1)), "text": json.dumps(dict(kit, rank="1")),
               "nested": "[" * 100_000 + "]" * 100_000, "shared": json.dumps(kit)}
    for name, text in kits_of.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o644 if name == "shared" else 0o600)
    broken = tmp_path / "broken"
    others = tmp_path / "others"
    others.mkdir()
    os.chown(others, 65534, 65534)  # (the tests run as root: a folder another user owns)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    cases = [(["--distributed", "--key", str(broken)], f"--key {broken} is not a kit written by --provision"),
             *[(["--distributed", "--key", str(tmp_path / name)], f"--key {tmp_path / name} is not a kit written by "
                                                                   "--provision") for name in ("huge", "negative", "text", "nested")],
             (["--distributed", "--key", str(tmp_path / "shared")], "can be read by others (mode 644): chmod 600 it"),
             (["--distributed", "--key", str(folder / "client-0")], "is client 0's kit, and this process is client 1"),
             (["--provision", str(folder)], "already holds kits"),
             (["--provision", str(others)], f"--provision {others} belongs to another user (uid 65534)")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            bench.main(argv + ["--site-sizes", "16,12"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setattr(secure, "AESGCM", None)
    for flag in ("--provision", "--key"):
        with pytest.raises(SystemExit) as stop:
            bench.main([flag, str(tmp_path / "new")] + (["--distributed"] if flag == "--key" else []))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f'{flag} needs cryptography: pip install -e ".[secure]"' in err


SECURE = DISTRIBUTED + ["--schemes", "sfv1", "--timeout", "60"]


def run_parties(folder, json_path, stranger=None, programs=None):
    """The three parties of a --key run started by hand (as torchrun would) on MASTER_PORT, and `stranger`
    (a function of the port) running beside them in a thread: (each party's stderr, exit statuses)."""
    port = launch.free_port()
    env = dict(os.environ, WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    programs = programs or {}
    parties = []
    with process_group([sys.executable, *programs.get(0, ["bench.py"]), *SECURE, "--distributed", "--key", str(folder),
                        "--json", str(json_path)], env=dict(env, RANK="0"), stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True) as server:
        parties.append(server)
        done = threading.Event()
        thread = threading.Thread(target=stranger, args=(port, done), daemon=True) if stranger else None
        for rank in (1, 2):
            parties.append(subprocess.Popen(
                [sys.executable, *programs.get(rank, ["bench.py"]), *SECURE, "--distributed", "--key", str(folder)],
                env=dict(env, RANK=str(rank)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                cwd=os.path.dirname(bench.__file__)))
        if thread:
            thread.start()
        try:
            errors = [party.communicate(timeout=300)[1] for party in parties]
        finally:
            done.set()
            for party in parties[1:]:
                party.kill()
                party.wait()
    return errors, [party.returncode for party in parties]


def stranger_store(port):
    """A stranger's client of the run's store: no kit, only the address."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return dist.TCPStore("127.0.0.1", port, 3, False, timeout=timedelta(seconds=30), wait_for_workers=False)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def garbage_on_every_port(port, done, seen):
    """Lists the store's keys and reads each, sends garbage to the store's port and to every mesh port it finds
    (and a hello whose signature is no kit's, and a connection that never speaks), until `done`."""
    store, silent = stranger_store(port), []
    while not done.is_set():
        try:
            attack_once(store, port, seen, silent)
        except Exception:  # the run ended and its store with it
            return
        time.sleep(0.05)


def attack_once(store, port, seen, silent):
    """One pass of `garbage_on_every_port`."""
    for key in store.list_keys():
        value = store.get(key)
        seen.add(key)
        if "mesh/" in key and f"{key} attacked" not in seen:
            host, mesh_port = value[66:].decode().split()
            for attack in (os.urandom(300), secure.MAGIC + struct.pack(">HH", 2, 0) + os.urandom(96), b""):
                with socket.create_connection((host, int(mesh_port)), timeout=5) as connection:
                    connection.sendall(attack)
            silent.append(socket.create_connection((host, int(mesh_port)), timeout=5))
            seen.add(f"{key} attacked")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(os.urandom(500))


def test_a_stranger_on_every_port_neither_joins_nor_changes_the_run_and_a_forged_key_stops_it_in_our_words(kits, tmp_path):
    """Client 1 connects to the mesh 5 s late, so that the others' listeners are open while the stranger
    sends them garbage. Without a kit it cannot join: the run is the same as without it, bit for bit. Then a
    stranger that overwrites every key it finds (with its own words) stops the run: every party says the
    store was tampered with, none says what the stranger wrote. Last, an impostor: client 1's process with
    client 0's signing key stops the run as failing authentication."""
    folder, _ = kits
    late = ["-c", "import secure, time\nconnect = secure.connect_peer\n"
                  "secure.connect_peer = lambda *args: time.sleep(5) or connect(*args)\nimport bench\nbench.main()"]
    seen = set()
    errors, statuses = run_parties(folder, tmp_path / "attacked.json",
                                   lambda port, done: garbage_on_every_port(port, done, seen), {2: late})
    assert statuses == [0, 0, 0], errors
    assert sorted(key[-15:] for key in seen if key.endswith("attacked")) == ["mesh/0 attacked", "mesh/1 attacked"], seen
    errors, statuses = run_parties(folder, tmp_path / "alone.json")
    assert statuses == [0, 0, 0], errors
    attacked, alone = (json.loads((tmp_path / name).read_text()) for name in ("attacked.json", "alone.json"))
    for key in ("auroc", "wire_bytes", "framing_bytes", "bytes"):
        assert attacked[0][key] == alone[0][key], key
    untimed = [[{key: value for key, value in entry.items() if key != "seconds"} for entry in run[0]["history"]]
               for run in (attacked, alone)]
    assert untimed[0] == untimed[1]

    def overwrite(port, done):
        store = stranger_store(port)
        while not done.is_set():
            try:
                for key in store.list_keys():
                    store.set(key, "SPOOFED: client 1 failed")
            except Exception:  # the run ended and its store with it
                return
            time.sleep(0.02)
    errors, statuses = run_parties(folder, tmp_path / "overwritten.json", overwrite)
    assert statuses == [1, 1, 1]
    for err in errors:
        assert "the rendezvous store was tampered with: " in err and "SPOOFED" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    impostor = ["-c", "import secure\nload = secure.load_kit\nsecure.load_kit = lambda path, rank, size: (lambda kit: "
                      "secure.Kit(2, kit.signing_key, kit.public_keys, kit.federation))(load(path, 1, size))\n"
                      "import bench\nbench.main()"]
    errors, statuses = run_parties(folder, tmp_path / "impostor.json", programs={2: impostor})
    assert statuses == [1, 1, 1]
    for err in errors[:2]:
        assert "failed authentication" in err and len(err.strip().splitlines()) == 1, err


def test_kits_are_their_owners_alone_and_never_written_through_a_planted_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("another user's file")
    folder = tmp_path / "federation"
    folder.mkdir()
    (folder / f"{secure.kit_name(1)}.tmp").symlink_to(elsewhere)  # planted where the kit is first written
    paths = secure.provision(str(folder), 3)
    assert elsewhere.read_text() == "another user's file" and not (folder / f"{secure.kit_name(1)}.tmp").exists()
    assert [os.stat(path).st_mode & 0o777 for path in paths] == [0o600] * 3
    assert secure.load_kit(str(folder), 1, 3).rank == 1


def test_the_launcher_refuses_kits_of_two_federations_before_starting_a_party(kits, tmp_path, monkeypatch, capsys):
    folder, _ = kits
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    secure.provision(str(tmp_path / "other"), 3)
    shutil.copy(tmp_path / "other" / "client-1", mixed / "client-1")  # one kit from another provisioning
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--distributed", "--key", str(mixed), "--site-sizes", "16,12"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--key {mixed / 'client-1'} is a kit of another federation than {mixed / 'server'}'s" in err


def test_a_party_started_by_hand_with_another_federations_kit_is_named_by_itself_and_by_the_others(kits, tmp_path):
    """As torchrun would start them, client 1 with a kit of another provisioning: it names the federation it
    expected (its kit's) and the one it met (the server's), the others name it; every party exits 2, at once
    (before, the others waited out --timeout and named nobody)."""
    folder, loaded = kits
    secure.provision(str(tmp_path / "other"), 3)
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.copy(tmp_path / "other" / "client-1", mixed / "client-1")
    theirs = secure.load_kit(str(mixed), 2, 3).federation.hex()[:8]
    errors, statuses = run_parties(mixed, tmp_path / "rows.json")
    assert statuses == [2, 2, 2], errors
    ours = loaded[0].federation.hex()[:8]
    for rank, err in enumerate(errors):
        assert err == f"bench.py: error: {secure.party_name(rank)}: " + (
            f"its kit is of federation {theirs}..., and the server's of {ours}..." if rank == 2 else
            f"client 1 announces a kit of federation {theirs}..., not this one's ({ours}...)") + \
            ": every party's kit comes from one --provision\n", err
