"""SplitFed: split learning plus federated averaging.

v1: every client trains its own copy of the client part, the server one copy of the server part per client,
    all in parallel; after each round the aggregator averages the client parts and the server its copies.
    The server serves its clients a mini-batch each, round and round: since each client has its own server
    copy, the order cannot change the result, and with real processes every client works while the server
    serves the others.
v2: client parts per client, averaged after each round; one server part, trained on the clients' activations
    in alternate client turns (or alternate mini-batch turns).
v3: like v1, but the client parts are never averaged: each site keeps its own.
To reuse: copy this file with splitlearn.py, fedlearn.py, data.py, common.py and densenet_split.py.
"""
from common import Run
from densenet_split import joined, split_flops
from fedlearn import average_models
from splitlearn import step_for, take_turns

VERSIONS = (1, 2, 3)


def train(client_model, server_model, train_sets, test_sets, version=1, turns="client", **cfg):
    """SplitFed v1, v2 or v3; `turns` orders v2's clients on its one server part ("client" or "batch");
    v1 and v3 run their clients in parallel."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")
    name = f"sfv{version}" + ("-batch" if version == 2 and turns == "batch" else "")
    run = Run(name, train_sets, test_sets, parallel=version != 2, **cfg)
    run.place(client_model, server_model)
    num_sites, num_examples = len(train_sets), [len(s) for s in train_sets]
    client_models = run.copies(client_model, range(num_sites))
    num_servers = 1 if version == 2 else num_sites  # v1, v3: one server copy per client
    server_models = run.copies(server_model, ["server"] * num_servers)
    client_optimizers = [run.optimizer(m) for m in client_models]
    server_optimizers = [run.optimizer(m) for m in server_models]
    flops = split_flops(client_model, server_model, run.image_shape)
    step = step_for(client_model)
    serves = [site % num_servers for site in range(num_sites)]  # the server copy each site trains with
    schedule = turns if version == 2 else "batch"  # v1, v3: the clients in parallel (see above)
    deployed = [joined(client_models[site], server_models[serves[site]]) for site in range(num_sites)]
    run.restore(*client_models, *server_models, *client_optimizers, *server_optimizers)  # if the run resumes
    for round in run.rounds_to_go():
        for site, images, labels in take_turns(run, train_sets, round, schedule):
            step(run, site, client_models[site], server_models[serves[site]], client_optimizers[site],
                 server_optimizers[serves[site]], images, labels, flops)
        if version != 3:  # the aggregator averages the client parts, over the network
            average_models(run, client_models, num_examples)
        if version != 2:  # the server averages its own copies of the server part
            average_models(run, server_models, num_examples, over_network=False)
        run.end_round(round, deployed)
    return run.result(deployed)
