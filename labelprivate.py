"""A label-private (U-shaped) split: the classifier head and the loss stay at the client, so labels never leave it.

The client runs its layers up to the cut and sends the activations (no labels); the server runs its part up to the
pooled features and sends them back; the client runs the head and the loss, returns the gradient of the features, and
the server returns the gradient of the activations. `label_private` makes the parts from a DenseNet split; `step` is
the training step that `splitlearn.train` and `splitfed.train` take as `step=`. A deployed model runs the client's
head last (`common.whole`). What the returned gradients still tell the server: `attacks.label_leak`.
"""
from collections import OrderedDict

from torch import nn

from common import bce
from densenet_split import ServerModel


class LabelPrivateClient(nn.Sequential):
    """The client part of a U-shaped split: the layers up to the cut, which `forward` runs, and the classifier `head`,
    which the client runs on the pooled features the server sends back."""

    def forward(self, images):
        for name, layer in self.named_children():
            if name != "head":
                images = layer(images)
        return images

    @property
    def body(self):
        """The layers up to the cut, without the head, as one module (sharing them)."""
        return nn.Sequential(OrderedDict((name, layer) for name, layer in self.named_children() if name != "head"))


def label_private(client_model, server_model):
    """(client, server) parts of a U-shaped split of a DenseNet split (`densenet_split.split_model`), sharing its layers:
    the classifier head moves to the client, the server's part ends with the pooled features."""
    client = LabelPrivateClient(OrderedDict([*client_model.named_children(), ("head", server_model.classifier)]))
    return client, ServerModel(server_model.features, nn.Identity())


def plain(client_model, server_model):
    """The two parts of the plain split again, the head back at the end of the server's (to merge them, say)."""
    return client_model.body, ServerModel(server_model.features, client_model.head)


def step(run, site, client_model, server_model, client_optimizer, server_optimizer, images, labels, flops):
    """One training step of client `site` across a U-shaped split; `flops` = (client, server) training FLOPs per sample
    (`splitlearn.split_flops`, the head's counted with the client's)."""
    with run.autocast():
        outputs = client_model(images)  # client: forward to the cut
    outputs = run.defended(site, images, outputs)
    activations = run.send(site, "server", outputs.detach()).requires_grad_()  # no labels
    with run.autocast():
        features = server_model(activations)  # server: on to the pooled features
    received = run.send("server", site, features.detach()).requires_grad_()
    with run.autocast():
        loss = bce(client_model.head(received), labels)  # client: the head and the loss
    client_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.note_loss(loss, len(labels))
    grad_features = run.send(site, "server", received.grad)  # (a defense hook may noise it on its way)
    server_optimizer.zero_grad(set_to_none=True)
    features.backward(grad_features)  # server: backward from the features, then its step
    server_optimizer.step()
    grad_activations = run.send("server", site, activations.grad)
    outputs.backward(grad_activations)  # client: backward from the cut, then one step for its layers and head
    client_optimizer.step()
    run.compute("client", flops[0] * len(labels))
    run.compute("server", flops[1] * len(labels))
