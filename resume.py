"""Going on with a bench run that `--save DIR` wrote and that was stopped: `bench.py --resume DIR`.

DIR holds run.json (the settings, `run_settings`), results.json (the rows finished) and, per row, the checkpoints of
its scheme (`checkpoints.Checkpoint`: the run's, or each party's own in a distributed run). A resumed run must repeat
the settings that change what trains (`TRAINED`; its rounds may only grow); its finished rows are kept, the
interrupted one goes on from its last complete round, the rest start. Anything else is refused, in one line, before
anything is written.
"""
import json
import os

import torch

import checkpoints
import report
from checkpoints import one_line
from secure import party_name

TRAINED = ("data", "sites", "site_sizes", "same_scanner", "partition", "data_seed", "image_size", "cut", "bn",
           "batch_size", "lr", "bf16", "layout", "order", "schemes", "seeds", "label_private", "attack", "attack_steps",
           "defense", "clip", "delta", "tradeoff")  # what a resumed run must repeat; besides, its rounds may only grow
BEFORE = {"data_seed": 0}  # what a setting was in a run.json written before it existed
NOTED = ("device", "deterministic", "threads")  # what changes the numbers in their last bits only


def run_settings(args):
    """The settings --save writes to DIR/run.json, as JSON holds them (a tuple comes back a list)."""
    settings = {key: getattr(args, key) for key in TRAINED + ("rounds", "device", "deterministic")}
    return json.loads(json.dumps(dict(settings, threads=torch.get_num_threads())))


def checkpoint_path(row, args, rank=None):
    """A row's checkpoint in its --save folder: the run's, or, in a distributed run (`rank`), the party's own."""
    name = "checkpoint.pt" if rank is None else f"checkpoint-{party_name(rank).replace(' ', '-')}.pt"
    return os.path.join(report.save_folder(row, args), name)


def fresh_checkpoint(row, args, rank=None):
    """Where a row's checkpoint goes under --save (`checkpoint_path`); a new run in an old folder (no --resume) starts
    afresh, removing the checkpoints it finds there."""
    path = checkpoint_path(row, args, rank)
    for stale in (path, checkpoints.previous(path)) if not args.resume else ():
        if os.path.exists(stale):
            os.remove(stale)
    return path


NUMBER, MAYBE = (int, float), (int, float, type(None))
ROW = dict(scheme=str, seed=int, history=list, auroc=MAYBE, auroc_interval=list, site_auroc=list, accuracy=MAYBE,
           bytes=dict, messages=dict, flops=dict, seconds=NUMBER)  # what a finished row must hold, to be kept and printed


def malformed(settings, finished_rows):
    """What is wrong with a --save folder's run.json (`settings`) and results.json (`finished_rows`), read as JSON,
    in a few words naming the file and the field; None where each holds what a run wrote (a row that failed keeps
    its scheme, seed and error alone)."""
    if not isinstance(settings, dict):
        return f"run.json holds a {type(settings).__name__}, not a run's settings"
    if not isinstance(finished_rows, list):
        return f"results.json holds a {type(finished_rows).__name__}, not a list of rows"
    for number, row in enumerate(finished_rows):
        if not isinstance(row, dict):
            return f"results.json row {number} is a {type(row).__name__}, not a row"
        fields = dict(ROW, error=str) if "error" in row else ROW
        for field, kind in fields.items():
            if "error" in row and field not in ("scheme", "seed", "error"):
                continue
            value = row.get(field)
            if not isinstance(value, kind) or isinstance(value, bool):
                return f"results.json row {number}: its {field} is {json.dumps(value)[:40]}, not a run's"
        if not all(isinstance(entry, dict) and isinstance(entry.get("round"), int) for entry in row.get("history", [])):
            return f"results.json row {number}: its history is not a list of rounds"
    return None


def resumable(args, rows, refuse, say, rank=None):
    """--resume DIR: of the run's `rows` (one per job: scheme, seed, defense), those DIR's run finished, by (scheme,
    seed, defense), once DIR is known to hold a run of these settings whose checkpoints (the server's, `rank` 0, in a
    distributed run) load whole. Anything else, before anything is written: `refuse` one line naming the setting or
    the file (`parser.error`: exit 2)."""
    where = f"--resume {args.resume}"
    try:
        with open(os.path.join(args.resume, "run.json")) as file:
            saved = json.load(file)
        finished_rows = []
        if os.path.exists(os.path.join(args.resume, "results.json")):
            with open(os.path.join(args.resume, "results.json")) as file:
                finished_rows = json.load(file)
    except FileNotFoundError as error:
        refuse(f"{where}: no {os.path.basename(error.filename)} there (a run with --save writes one)")
    except (OSError, ValueError, RecursionError) as error:
        refuse(f"{where}: {one_line(error)}")
    wrong = malformed(saved, finished_rows)
    if wrong:
        refuse(f"{where}: {wrong}")
    now = run_settings(args)
    for key in TRAINED:
        had = saved.get(key, BEFORE.get(key))
        if had != now[key]:
            refuse(f"{where}: --{key.replace('_', '-')} differs (the run had {had}, now {now[key]})")
    for key in NOTED:
        if saved.get(key) != now[key]:
            say(f"note: the run had {key} {saved.get(key)}, now {now[key]}: the numbers may differ in their last bits")
    finished = {}
    for row in rows:
        key = row["scheme"], row["seed"], row["defense"]
        earlier = [prior for prior in finished_rows if not prior.get("error")
                   and (prior["scheme"], prior["seed"], prior.get("defense", "none")) == key]
        done = [len(prior["history"]) for prior in earlier]
        if args.rounds in done:
            finished[key] = earlier[done.index(args.rounds)]
            continue
        path = checkpoint_path(row, args, rank)
        if os.path.exists(path):  # the run goes on from it: it must load whole
            try:
                done.append(len(checkpoints.load_checkpoint(path)["run"]["history"]))
            except ValueError as error:
                refuse(f"{where}: {error}")
        if max(done, default=0) > args.rounds:
            refuse(f"{where}: --rounds {args.rounds}, but {report.name(row)} has trained {max(done)} already")
    return finished


def kept_rows(args, rows, refuse, say, transport=None):
    """--resume: the rows the run finished before, by (scheme, seed, defense), which are not trained again
    (`resumable`); under a transport every party learns from rank 0 which they are."""
    if not args.resume or transport is None:
        return resumable(args, rows, refuse, say) if args.resume else {}
    finished = resumable(args, rows, refuse, say, rank=0) if transport.rank == 0 else {}
    keys = [(row["scheme"], row["seed"], row["defense"]) for row in rows]  # the rows rank 0 keeps from results.json:
    kept = transport.share([float(key in finished) for key in keys])      # the other parties skip them too
    return finished if transport.rank == 0 else {key: row for key, row, flag in zip(keys, rows, kept) if flag}
