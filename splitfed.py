"""SplitFed: split learning plus federated averaging (v1 and v2: Thapa et al., AAAI 2022; v3: Gawali et al. 2021).

Every client trains its own copy of the client part through the server, one split step at a time
(`splitlearn.split_step`); after each round some copies are averaged (`fedlearn.fedavg`). The three versions differ
only in the number of server parts and in what is averaged (`VERSIONS`):

    version  server parts                             client parts, each round    server parts, each round
    1        one per client, the clients in parallel  averaged by the aggregator  averaged by the server
    2        one, trained in the clients' turns       averaged by the aggregator  (one: nothing to average)
    3        one per client, the clients in parallel  each site keeps its own     averaged by the server

With a server part per client the server serves its clients a mini-batch each, round and round: the order cannot
change the result, and with real processes every client works while the server serves the others. v2's clients take
turns on its one server part, an epoch each (turns="client") or a mini-batch each (turns="batch"), in the run's order.
To reuse: copy this file with splitlearn.py, fedlearn.py and common.py.
"""
from typing import NamedTuple

from common import Run
from fedlearn import average_models, fedavg
from splitlearn import split_flops, split_step, take_turns


class Version(NamedTuple):
    server_per_client: bool  # a server part per client, the clients in parallel (else one, in turns)
    average_client_parts: bool
    average_server_parts: bool


VERSIONS = {1: Version(server_per_client=True, average_client_parts=True, average_server_parts=True),
            2: Version(server_per_client=False, average_client_parts=True, average_server_parts=False),
            3: Version(server_per_client=True, average_client_parts=False, average_server_parts=True)}


def train(client_model, server_model, train_sets, test_sets, version=1, turns="client", step=split_step, **cfg):
    """SplitFed v1, v2 or v3 (`VERSIONS`); `turns` orders v2's clients on its one server part ("client" or "batch");
    `step`: one training step across the cut (`split_step`, or another split's)."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {tuple(VERSIONS)}, not {version!r}")
    protocol = VERSIONS[version]
    name = f"sfv{version}" + ("-batch" if not protocol.server_per_client and turns == "batch" else "")
    run = Run(name, train_sets, test_sets, **cfg)
    run.place(client_model, server_model)
    num_sites, num_examples = len(train_sets), [len(s) for s in train_sets]
    client_models = run.copies(client_model, range(num_sites))
    server_models = run.copies(server_model, ["server"] * (num_sites if protocol.server_per_client else 1))
    serves = [site % len(server_models) for site in range(num_sites)]  # the server part each site trains with
    serving = [server_models[serves[site]] for site in range(num_sites)]
    client_optimizers = [run.optimizer(m) for m in client_models]
    server_optimizers = [run.optimizer(m) for m in server_models]
    flops = split_flops(client_model, server_model, run.image_shape)
    schedule = "batch" if protocol.server_per_client else turns  # in parallel: a mini-batch each, round and round
    for round in run.rounds(*client_models, *server_models, *client_optimizers, *server_optimizers):
        for site, images, labels in take_turns(run, train_sets, round, schedule):
            step(run, site, client_models[site], serving[site], client_optimizers[site],
                 server_optimizers[serves[site]], images, labels, flops)
        if protocol.average_server_parts:  # the server averages its own copies of the server part: nothing travels
            average = fedavg([m.state_dict() for m in server_models], num_examples)  # (while the clients finish)
            run.compute("aggregator", 2 * len(server_models) * sum(t.numel() for t in average.values()))
            for server_model in server_models:
                server_model.load_state_dict(average)
        if protocol.average_client_parts:  # the aggregator averages the client parts, over the network
            average_models(run, client_models, num_examples)
        run.deploy_and_score(client_models, serving)  # each site: its client part, the server part serving it
    return run.result(client_models, serving)
