"""Folding eval-mode BatchNorm into the conv before it, inside the engine's private graphs.

The tail runs once per ablation, so each BatchNorm is an extra pass over every activation of
every ablated image; folded into the conv's weights and bias it costs nothing. Only the engine's
own copies (prefix and tail GraphModules) are changed, never the user's model.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_conv_bn(gm: fx.GraphModule, cache: dict[tuple[int, int], nn.Conv2d] | None = None
                 ) -> fx.GraphModule:
    """Replace every conv -> BatchNorm2d pair (BN the conv's only user) by one conv, in place.
    `cache` ({(id(conv), id(bn)): folded conv}) lets graphs over the same modules share one
    folded copy of each pair (the unit scorers of one network do)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        conv = gm.get_submodule(node.target)
        if type(conv) is not nn.Conv2d:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,):
            continue
        bn = gm.get_submodule(user.target)
        if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or bn.running_mean is None:
            continue
        key = (id(conv), id(bn))
        fused = cache.get(key) if cache is not None else None
        if fused is None:
            with torch.no_grad():
                fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
            if cache is not None:
                cache[key] = fused
        name = f"{node.target.replace('.', '_')}__bnfold"
        gm.add_submodule(name, fused)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, node.args, node.kwargs)
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm
